"""The defense plug-in interface and its registry.

A defense is a class registered with `@register_defense("name")`, with a `Config` dataclass of knobs built from
`conf/defense/<name>.yaml`. Its core is `transform`: a pure function from the client's update to the update the
client sends. The client applies it in a Flower mod built from the run's config at call time
(`fedsim.client_app.defense_mod`); defenses that change the model or the protocol (key-lock, secure aggregation)
override the hooks below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedsim.config import _plain, build_config
from fedsim.registry import Registry

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

    def transform(self, update: Mapping[str, Tensor], ctx: DefenseContext) -> dict[str, Tensor]:
        """The update the client sends instead of `update` (parameter name -> tensor). Must not mutate its input."""
        return dict(update)

    def strength(self) -> dict[str, float]:
        """The knobs that measure this defense's strength, for results tables (e.g. {"sigma": 0.1})."""
        return {}

    def privacy(self, rounds: int, sample_rate: float) -> dict[str, float]:
        """Formal guarantees after `rounds` rounds (e.g. {"epsilon": ..., "delta": ...}); empty when there are none."""
        return {}


def build_defense(node: Any, prefix: str = "defense") -> Defense:
    """Build the defense named by `node.name` with its knobs validated against its `Config`."""
    values = dict(_plain(node) or {})
    name = values.get("name", "none")
    cls = DEFENSES.get(name, key=f"{prefix}.name")
    return cls(build_config(cls.Config, values, prefix, ignore=("name",)))
