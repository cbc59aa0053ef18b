"""Defenses composed in a declared order (`defense=stack`).

    defense:
      name: stack
      steps:                       # applied to the update in this order: the first listed acts first
        - {name: clip, clip: 1.0}
        - {name: pruning, keep: 0.1}
        - {name: noise, clip: 1.0, sigma: 0.01}

Each step is any registered defense with its own knobs (checked as `defense.steps[i].<knob>`). Update transforms
run in list order on the client. Steps with a client mod sit at the end of the list where their mod acts (as each
declares, `Defense.client_mods`): a "model" step (key-lock: which private layers the update excludes) must come
first, a "protocol" step (secagg: how the result is sent) last; a stack inside a stack is refused. Hooks chain in
list order (`build_model`, `client_mods`, `wrap_grid`, `wrap_strategy`, `observe`).

Privacy: every Gaussian-with-clipping step is a DP mechanism on its own, and the other steps are either
post-processing (after it) or an input it bounds anyway (before it), so the stack reports the smallest epsilon of
its steps.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from fedsim.defenses.base import ClientMod, Defense, DefenseContext, build_defense, register_defense
from fedsim.errors import ConfigError
from fedsim.schema import knob

# Where a step with a client mod at each position must sit in the list, and why.
PLACES = {"model": ("first", "it decides which layers the update holds"),
          "protocol": ("last", "it is how the finished update is sent")}


@dataclass(frozen=True)
class StackConfig:
    steps: list[dict] = knob([{"name": "clip", "clip": 1.0}, {"name": "pruning", "keep": 0.1},
                              {"name": "noise", "clip": 1.0, "sigma": 0.01}],
                             help="defenses applied in this order, each {name: ..., <its knobs>}")


@register_defense("stack")
class Stack(Defense):
    """Several defenses, applied in the declared order."""

    name = "stack"
    Config = StackConfig

    def __init__(self, config: Any | None = None) -> None:
        super().__init__(config)
        self._steps: list[Defense] = []

    def validate(self, prefix: str) -> None:
        steps = self.config.steps
        if not steps:
            raise ConfigError(f"{prefix}.steps", steps, "a non-empty list of defenses ({name: ..., knobs})")
        built = []
        for i, node in enumerate(steps):
            key = f"{prefix}.steps[{i}]"
            if not isinstance(node, Mapping) or "name" not in node:
                raise ConfigError(key, node, "a mapping with a defense name, e.g. {name: noise, sigma: 0.1}")
            if node["name"] == "stack":
                raise ConfigError(f"{key}.name", "stack", "a defense other than stack (list the steps instead)")
            step = build_defense(node, key)
            for position in sorted({m.position for m in step.client_mods()}):
                place, why = PLACES[position]
                if i != (0 if place == "first" else len(steps) - 1):
                    raise ConfigError(f"{key}.name", node["name"], f"{node['name']} only as the {place} step ({why})")
            built.append(step)
        self._steps = built
        self.name = "+".join(d.name for d in built)  # type: ignore[misc]

    def check_run(self, run, prefix: str = "defense") -> None:
        for i, step in enumerate(self._steps):
            step.check_run(run, f"{prefix}.steps[{i}]")

    # -- composition ----------------------------------------------------------------------------------------------
    def steps(self) -> list[Defense]:
        return list(self._steps)

    @property
    def transforms(self) -> bool:
        return any(d.transforms for d in self._steps)

    def transform(self, update: Mapping[str, Tensor], ctx: DefenseContext) -> dict[str, Tensor]:
        out = dict(update)
        for step in self._steps:
            if step.transforms:
                out = step.transform(out, ctx)
        return out

    def strength(self) -> dict[str, float | str]:
        seen = Counter(d.name for d in self._steps)
        out: dict[str, float | str] = {"steps": "+".join(d.name for d in self._steps)}
        count: Counter = Counter()
        for step in self._steps:
            count[step.name] += 1
            tag = step.name if seen[step.name] == 1 else f"{step.name}{count[step.name]}"
            out.update({f"{tag}.{k}": v for k, v in step.strength().items()})
        return out

    def privacy(self, rounds: int, sample_rate: float, releases: int | None = None) -> dict[str, float | str]:
        reports = [d.privacy(rounds, sample_rate, releases) for d in self._steps]
        dp = [r for r in reports if "epsilon" in r]
        if dp:
            return min(dp, key=lambda r: r["epsilon"] if r["epsilon"] is not None else math.inf)
        labels = [str(r["privacy"]) for r in reports if "privacy" in r]
        return {"privacy": "; ".join(labels)} if labels else {}

    def client_mods(self) -> list[ClientMod]:
        return [mod for step in self._steps for mod in step.client_mods()]

    def build_model(self, model: nn.Module, *, private: bool) -> nn.Module:
        for step in self._steps:
            model = step.build_model(model, private=private)
        return model

    def wrap_grid(self, grid, run):
        for step in self._steps:
            grid = step.wrap_grid(grid, run)
        return grid

    def wrap_strategy(self, strategy):
        for step in self._steps:
            strategy = step.wrap_strategy(strategy)
        return strategy

    def observe(self, obs):
        for step in self._steps:
            obs = step.observe(obs)
        return obs
