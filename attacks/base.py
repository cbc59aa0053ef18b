"""The attack plug-in interface and its registry.

An attack is a class registered by name with `@register_attack("name")`, with a `Config` dataclass of knobs
(built from `conf/attack/<name>.yaml` by `fedsim.config.build_config`). It may refuse a model or threat model at
config time (`check`), and turns an `Observation` into a `Reconstruction` (`reconstruct`). It never sees ground
truth.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from fedsim.errors import AttackNotApplicable
from fedsim.registry import Registry
from fedsim.threat import Observation, Reconstruction, TrainMeta

ATTACKS: Registry[type["Attack"]] = Registry("attack", package="fedsim.attacks")

register_attack = ATTACKS.register

# Facts an attack may need from the threat model (see `fedsim.threat.TrainMeta`).
HOOK_KEYS = ("name", "targets", "sample", "rounds")  # keys of the attack node that belong to the hook, not the attack
CAPABILITIES = frozenset({"batch_size", "local_steps", "lr", "labels", "buffers"})


@dataclass(frozen=True)
class NoKnobs:
    """Config of an attack without knobs."""


class Attack(ABC):
    """Base class of all attacks."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoKnobs
    requires: ClassVar[frozenset[str]] = frozenset()  # subset of CAPABILITIES the attack cannot run without

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def check(self, model: nn.Module, meta: TrainMeta) -> None:
        """Raise `AttackNotApplicable` (one line, the reason) when this attack cannot run on `model` under `meta`.

        Called once at config time with the global model and a template of what the threat model grants.
        """
        missing = [cap for cap in sorted(self.requires) if _granted(meta, cap) is None]
        if missing:
            raise AttackNotApplicable(f"{self.name} needs the threat model to grant {', '.join(missing)}")

    @abstractmethod
    def reconstruct(self, obs: Observation) -> Reconstruction:
        """Reconstruct the client's data from one observation."""


def _granted(meta: TrainMeta, capability: str) -> Any:
    if capability == "buffers":
        return True  # checked per observation
    return getattr(meta, capability)


def build_attack(node: Any, prefix: str = "attack") -> Attack:
    """Build the attack named by `node.name` with its knobs validated against its `Config`."""
    _, cls, config = ATTACKS.build(node, prefix, ignore=HOOK_KEYS)
    return cls(config)
