"""Clipping and additive noise on the client's update (`defense=clip`, `defense=noise`).

`clip` scales the whole update (all parameter tensors concatenated) down to an L2 norm of at most `clip`.
`noise` clips the same way, then adds i.i.d. noise to every coordinate:

    gaussian:  N(0, (sigma * clip)^2)          laplace:  Laplace(0, b = sigma * clip)   (std sqrt(2) b)

Gaussian noise on a clipped update is the Gaussian mechanism with L2 sensitivity `clip` per client and round,
i.e. client-level DP in the DP-FedAvg sense (McMahan et al. 2018, "Learning differentially private recurrent
language models": one client's whole contribution is added or removed). Its cost is tracked with the RDP
accountant of Google's dp-accounting over `rounds` compositions of the Poisson-subsampled Gaussian mechanism with
q = clients per round / clients; `epsilon` is reported per round and cumulatively at `delta`. Two honest caveats
are recorded beside it:

- `epsilon_server`: the curious server chose the sample, so amplification by subsampling does not hold against it;
  this is the same accounting with q = 1 (equal to `epsilon` with full participation).
- Noise is added by each client (local), so the server sees each noisy update. The guarantee is for adding or
  removing one client; changing a client's data arbitrarily (replace-one) doubles the sensitivity.

Laplace noise, or noise without clipping (`clip: null`, the std is then `sigma` in absolute units), bounds no
sensitivity that gives a useful epsilon: such runs are labelled `noise` and report no epsilon.

A zero update is left at zero norm before noise (Flower's own clipping mods divide by the norm and raise
ZeroDivisionError there).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from defenses.base import Defense, DefenseContext, register_defense
from fedsim.config import knob

MECHANISMS = ("gaussian", "laplace")


# --- the transforms: pure functions of tensors ---------------------------------------------------------------------

def l2_norm(update: Mapping[str, Tensor]) -> float:
    """L2 norm of all tensors of `update` concatenated (float64 accumulation)."""
    return math.sqrt(sum(float(v.detach().double().pow(2).sum()) for v in update.values()))


def clip_update(update: Mapping[str, Tensor], clip: float) -> dict[str, Tensor]:
    """`update * min(1, clip / ||update||)`: the whole update scaled to an L2 norm of at most `clip`.

    A zero update stays zero (no division by its norm).
    """
    norm = l2_norm(update)
    factor = 1.0 if norm <= clip else clip / norm
    return {k: v * factor for k, v in update.items()}


def gaussian_noise(update: Mapping[str, Tensor], std: float, gen: torch.Generator) -> dict[str, Tensor]:
    """`update + N(0, std^2)` per coordinate."""
    return {k: v + std * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in update.items()}


def laplace_noise(update: Mapping[str, Tensor], scale: float, gen: torch.Generator) -> dict[str, Tensor]:
    """`update + Laplace(0, scale)` per coordinate (the difference of two Exp(1/scale) draws)."""
    def exp(shape: torch.Size, dtype: torch.dtype) -> Tensor:
        u = torch.rand(shape, generator=gen, dtype=torch.float64)
        return (-torch.log1p(-u)).to(dtype)  # -log(1 - u) for u in [0, 1): finite

    return {k: v + scale * (exp(v.shape, v.dtype) - exp(v.shape, v.dtype)) for k, v in update.items()}


# --- accounting ----------------------------------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def gaussian_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """epsilon after `rounds` Poisson-subsampled Gaussian mechanisms (RDP accountant, add/remove one client).

    noise_multiplier: noise std / L2 sensitivity. sample_rate: probability a client takes part in a round.
    """
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    absl = logging.getLogger("absl")  # dp-accounting warns for fractional orders it cannot evaluate, and skips them
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        event = dp_accounting.GaussianDpEvent(noise_multiplier)
        if sample_rate < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
        accountant.compose(event, rounds)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


# --- the defenses --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipConfig:
    clip: float = knob(1.0, gt=0.0, help="L2 norm the whole update is scaled down to (if larger)")


@register_defense("clip")
class Clip(Defense):
    """L2 clipping of the whole update: a bound on each client's influence, no noise, no privacy guarantee."""

    name = "clip"
    Config = ClipConfig

    def transform(self, update: Mapping[str, Tensor], ctx: DefenseContext) -> dict[str, Tensor]:
        return clip_update(update, self.config.clip)

    def strength(self) -> dict[str, float | str]:
        return {"clip": self.config.clip}


@dataclass(frozen=True)
class NoiseConfig:
    clip: float | None = knob(1.0, gt=0.0, help="L2 norm the update is clipped to first; null: no clipping")
    sigma: float = knob(0.1, ge=0.0, help="noise multiplier: std (gaussian) or scale (laplace) = sigma * clip")
    mechanism: str = knob("gaussian", choices=MECHANISMS, help="gaussian (DP with clipping) or laplace (noise only)")
    delta: float = knob(1e-5, gt=0.0, lt=1.0, help="delta at which epsilon is reported (gaussian with clipping)")


@register_defense("noise")
class Noise(Defense):
    """Clip the update to an L2 norm, then add Gaussian or Laplace noise to every coordinate."""

    name = "noise"
    Config = NoiseConfig

    @property
    def scale(self) -> float:
        """Noise std (gaussian) or Laplace scale, in the update's units."""
        cfg = self.config
        return cfg.sigma * (cfg.clip if cfg.clip is not None else 1.0)

    @property
    def is_dp(self) -> bool:
        """A real DP mechanism: Gaussian noise of positive std on an update of bounded L2 norm."""
        cfg = self.config
        return cfg.mechanism == "gaussian" and cfg.clip is not None and cfg.sigma > 0

    def transform(self, update: Mapping[str, Tensor], ctx: DefenseContext) -> dict[str, Tensor]:
        cfg = self.config
        clipped = clip_update(update, cfg.clip) if cfg.clip is not None else dict(update)
        if cfg.sigma == 0:
            return clipped
        if cfg.mechanism == "gaussian":
            return gaussian_noise(clipped, self.scale, ctx.generator)
        return laplace_noise(clipped, self.scale, ctx.generator)

    def strength(self) -> dict[str, float | str]:
        cfg = self.config
        return {"clip": cfg.clip, "sigma": cfg.sigma, "mechanism": cfg.mechanism, "scale": self.scale}

    def privacy(self, rounds: int, sample_rate: float) -> dict[str, float | str]:
        cfg = self.config
        if not self.is_dp:
            why = "laplace noise" if cfg.mechanism == "laplace" else ("no clipping" if cfg.clip is None else "sigma 0")
            return {"privacy": f"noise ({why}: no DP guarantee)"}
        if rounds <= 0:
            return {"privacy": "dp", "epsilon": 0.0, "epsilon_round": 0.0, "epsilon_server": 0.0, "delta": cfg.delta}
        return {
            "privacy": "dp",
            "epsilon": gaussian_epsilon(cfg.sigma, sample_rate, rounds, cfg.delta),
            "epsilon_round": gaussian_epsilon(cfg.sigma, sample_rate, 1, cfg.delta),
            "epsilon_server": gaussian_epsilon(cfg.sigma, 1.0, rounds, cfg.delta),
            "delta": cfg.delta,
        }

