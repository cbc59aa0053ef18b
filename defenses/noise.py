"""Clipping and additive noise on the client's update (`defense=clip`, `defense=noise`).

`clip` scales the whole update (all parameter tensors concatenated) down to an L2 norm of at most `clip`.
`noise` clips the same way, then adds i.i.d. noise to every coordinate:

    gaussian:  N(0, (sigma * clip)^2)          laplace:  Laplace(0, b = sigma * clip)   (std sqrt(2) b)

Gaussian noise on a clipped update is the Gaussian mechanism, applied by each client to what it sends (local
noise). The curious server sees each client's noisy update on its own, so the guarantee that matters is about one
client's data changing arbitrarily between two worlds, the replace-one relation, and it is what `epsilon` reports:

- Sensitivity. Two updates of the same client, each clipped to L2 norm C, differ by at most 2C (replace-one); the
  add/remove-one relation of DP-FedAvg (McMahan et al. 2018) compares an update with its absence, at distance C.
  The noise std is sigma * C, so the replace-one mechanism is the add/remove Gaussian mechanism with noise
  multiplier (sigma * C) / (2C) = sigma / 2: the RDP of a Gaussian at order alpha is alpha * Delta^2 / (2 std^2),
  which only sees the ratio std / Delta. `epsilon` is therefore dp-accounting's RDP accountant (add/remove) at
  noise multiplier sigma / 2, no subsampling (sigma 1, 40 rounds, delta 1e-5: 138.7; add/remove would say 48.8;
  tests/test_noise.py checks both against opacus' RDP accountant).
- No amplification. The server samples the clients of each round itself, from a seed it knows
  (`fedsim.strategy`), so amplification by subsampling does not hold against it.
- Composition. A client releases one update in each round it takes part in; `epsilon` composes over the worst
  client's count (`releases`: the most rounds any one client was asked to train in; an upper bound on what it
  released, since a client that crashed released nothing).
- Everything sent. The client mod hands the defense every floating-point array it sends: parameter gradients or
  deltas and the change of each BatchNorm running statistic (`fedsim.client_app.defense_mod`), all clipped
  together to C and noised, so the bound covers the statistics too (integer step counters depend on no data).

`epsilon_round` is one release under the same relation. `epsilon_third_party` is the usual DP-FedAvg figure:
add/remove one client, amplified by Poisson sampling at q = clients per round / clients, over all rounds. It holds
only against an observer of the released models who does not know which clients were sampled (and fedsim samples
a fixed number without replacement, not Poisson), never against the server.

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

from fedsim.defenses.base import Defense, DefenseContext, register_defense
from fedsim.schema import knob

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

    noise_multiplier: noise std / L2 sensitivity (C under add/remove). sample_rate: probability a client takes part
    in a round (1: no subsampling).
    """
    import dp_accounting  # heavy: dp-accounting loads only when a guarantee is computed
    from dp_accounting.rdp import RdpAccountant  # heavy: dp-accounting loads only when a guarantee is computed

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


def local_epsilon(sigma: float, releases: int, delta: float) -> float:
    """epsilon of `releases` local Gaussian releases of one client's update clipped to C with noise std sigma * C,
    replace-one relation (sensitivity 2C), no subsampling: the add/remove accountant at noise multiplier sigma / 2."""
    return gaussian_epsilon(sigma / 2.0, 1.0, releases, delta)


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

    def privacy(self, rounds: int, sample_rate: float, releases: int | None = None) -> dict[str, float | str]:
        """After `rounds` rounds in which the worst client took part in `releases` (default: all of them)."""
        cfg = self.config
        if not self.is_dp:
            why = "laplace noise" if cfg.mechanism == "laplace" else ("no clipping" if cfg.clip is None else "sigma 0")
            return {"privacy": f"noise ({why}: no DP guarantee)"}
        releases = rounds if releases is None else releases
        return {
            "privacy": "dp",
            "relation": "replace-one",
            "epsilon": local_epsilon(cfg.sigma, releases, cfg.delta),
            "epsilon_releases": releases,
            "epsilon_round": local_epsilon(cfg.sigma, 1, cfg.delta),
            "epsilon_third_party": gaussian_epsilon(cfg.sigma, sample_rate, rounds, cfg.delta),
            "delta": cfg.delta,
        }
