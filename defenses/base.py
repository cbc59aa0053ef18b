"""The defense plug-in interface and its registry.

A defense is a class registered with `@register_defense("name")`, with a `Config` dataclass of knobs built from
`conf/defense/<name>.yaml`. Its core is `transform`: a pure function from the client's update to the update the
client sends. The client applies it in a Flower mod built from the run's config at call time
(`fedsim.client_app.defense_mod`).

A defense brings its whole self through its class, so a new one is one module and one YAML file. Defenses that
change the model or the protocol override the hooks below instead of (or as well as) `transform`; each hook's
default leaves things as they are, so the federation calls them unconditionally:

  client side
    client_mods()                    Flower mods the client app runs for it, each at a declared `position`:
                                     "protocol" (outermost: how the finished update travels, e.g. SecAgg+) or
                                     "model" (innermost, next to training: which layers the update holds, e.g.
                                     key-lock's private layers). The client app composes what the configured
                                     defenses declare; a stack places a "model" defense first and a "protocol"
                                     one last.
    build_model(model, private=True) the architecture clients train
  server side
    build_model(model, private=False) the model the server holds (key-lock: shared layers only)
    wrap_grid(grid, run)             the Grid the server talks through (secure aggregation runs its protocol there)
    wrap_strategy(strategy)          the strategy under the curious hook (key-lock asks clients to evaluate)
    observe(obs)                     the attacker's view of one observation under this defense's threat settings

Defenses compose in a declared order with `defense=stack` (`defenses/stack.py`).

Layer: attacks and defenses sit side by side above data and models and below the federation; a defense imports
the core (schema, registry, wire protocol, seeds), data and models, never an attack or the federation's apps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from fedsim.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy

    from fedsim.threat import Observation

DEFENSES: Registry[type["Defense"]] = Registry("defense", package="fedsim.defenses", default="none")
register_defense = DEFENSES.register


@dataclass(frozen=True)
class DefenseContext:
    """What a defense may use on the client when transforming one update."""

    round: int
    client: int                  # partition id
    mode: str                    # "fedsgd" (update = gradient) or "fedavg" (update = weight delta)
    num_examples: int
    generator: torch.Generator   # seeded from (seed, round, client): defenses draw their randomness here


POSITIONS = ("protocol", "model")  # where a defense's client mod sits in the client's chain (see ClientMod)


class ClientSide(Protocol):
    """What a defense's client mod is handed about the run on this client (fedsim.client_app.ClientPlan)."""

    run: Any            # the validated run configuration (fedsim.config.RunConfig): seed, fl, data, model, ...
    defense: "Defense"  # the configured defense (a stack holds its steps)

    def model(self) -> nn.Module:
        """The model this client trains (with its private parts), built once per process."""


@dataclass(frozen=True)
class ClientMod:
    """A client mod a defense brings: `mod(msg, context, call_next, client)` is a Flower mod with one more
    argument, the client's side of the run (`ClientSide`).

    position: "protocol": outermost, around fault injection and the update transform (it sees the finished
        update: how it travels); "model": innermost, around the train handler (it decides what the model holds
        and which layers the update carries). Within one position, mods run in the order the defenses are listed
        (the first outermost).
    """

    position: str
    mod: Callable[..., Any]

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"ClientMod position {self.position!r}: one of {', '.join(POSITIONS)}")


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

    def check_run(self, run: Any, prefix: str = "defense") -> None:
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
    def client_mods(self) -> list[ClientMod]:
        """The mods the client app runs for this defense (none by default)."""
        return []

    def build_model(self, model: nn.Module, *, private: bool) -> nn.Module:
        """The model clients train (`private=True`) or the server holds (`private=False`), given the plain one."""
        return model

    def wrap_grid(self, grid: "Grid", run: Any) -> "Grid":
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
    _, cls, config = DEFENSES.build(node, prefix)
    defense = cls(config)
    defense.validate(prefix)
    return defense
