"""The defense plug-in interface and its registry.

A defense is a class registered with `@register_defense("name")`, with a `Config` dataclass of knobs built from
`conf/defense/<name>.yaml`. Its core is `transform`: a pure function from the client's update to the update the
client sends. The client applies it in a Flower mod built from the run's config at call time
(`fedsim.client_app.defense_mod`).

Defenses that change the model or the protocol override the hooks below instead of (or as well as) `transform`;
each hook's default leaves things as they are, so the federation calls them unconditionally:

    build_model(model, private=...)  the architecture clients train (private=True) and the server holds (key-lock)
    wrap_grid(grid, run)             the Grid the server talks through (secure aggregation runs its protocol there)
    wrap_strategy(strategy)          the strategy under the curious hook (key-lock asks clients to evaluate)
    observe(obs)                     the attacker's view of one observation under this defense's threat settings

Defenses compose in a declared order with `defense=stack` (`defenses/stack.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from fedsim.config import _plain, build_config
from fedsim.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy

    from fedsim.config import RunConfig
    from fedsim.threat import Observation

DEFENSES: Registry[type["Defense"]] = Registry("defense", package="defenses")
register_defense = DEFENSES.register


@dataclass(frozen=True)
class DefenseContext:
    """What a defense may use on the client when transforming one update."""

    round: int
    client: int                  # partition id
    mode: str                    # "fedsgd" (update = gradient) or "fedavg" (update = weight delta)
    num_examples: int
    generator: torch.Generator   # seeded from (seed, round, client): defenses draw their randomness here


@dataclass(frozen=True)
class NoKnobs:
    """Config of a defense without knobs."""


class Defense:
    """Base class of all defenses: the identity."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoKnobs

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def validate(self, prefix: str) -> None:
        """Checks across knobs, at the door: raise ConfigError naming `prefix`.knob. None by default."""

    def check_run(self, run: "RunConfig", prefix: str = "defense") -> None:
        """Checks against the rest of the run's configuration (fedsim.config.validate); none by default."""

    # -- the update ---------------------------------------------------------------------------------------------
    def transform(self, update: Mapping[str, Tensor], ctx: DefenseContext) -> dict[str, Tensor]:
        """The update the client sends instead of `update` (parameter name -> tensor). Must not mutate its input."""
        return dict(update)

    @property
    def transforms(self) -> bool:
        """Whether `transform` is more than the identity (the client mod skips it otherwise)."""
        return type(self).transform is not Defense.transform

    # -- what the results record --------------------------------------------------------------------------------
    def strength(self) -> dict[str, float | str]:
        """The knobs that measure this defense's strength, for results tables (e.g. {"sigma": 0.1})."""
        return {}

    def privacy(self, rounds: int, sample_rate: float, releases: int | None = None) -> dict[str, float]:
        """Formal guarantees after `rounds` rounds, in which the client that took part most often took part in
        `releases` (None: all), against the curious server (e.g. {"epsilon": ..., "delta": ...}); empty when
        there are none. `sample_rate`: clients per round / clients."""
        return {}

    # -- model and protocol hooks (identity by default) ---------------------------------------------------------
    def build_model(self, model: nn.Module, *, private: bool) -> nn.Module:
        """The model clients train (`private=True`) or the server holds (`private=False`), given the plain one."""
        return model

    def wrap_grid(self, grid: "Grid", run: "RunConfig") -> "Grid":
        """The Grid the server sends its messages through."""
        return grid

    def wrap_strategy(self, strategy: "Strategy") -> "Strategy":
        """The strategy the curious hook wraps."""
        return strategy

    def observe(self, obs: "Observation") -> "Observation":
        """What the attacker is given for one observation (defense secrets per the threat model, in `meta.private`)."""
        return obs

    def steps(self) -> list["Defense"]:
        """The defenses this one is made of, in order (itself, unless it is a stack)."""
        return [self]

    def find(self, cls: type) -> Any:
        """The first step that is an instance of `cls`, or None."""
        return next((d for d in self.steps() if isinstance(d, cls)), None)


def build_defense(node: Any, prefix: str = "defense") -> Defense:
    """Build the defense named by `node.name` with its knobs validated against its `Config`."""
    values = dict(_plain(node) or {})
    name = values.get("name", "none")
    cls = DEFENSES.get(name, key=f"{prefix}.name")
    defense = cls(build_config(cls.Config, values, prefix, ignore=("name",)))
    defense.validate(prefix)
    return defense
