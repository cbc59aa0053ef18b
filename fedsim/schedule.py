"""Which rounds the curious server attacks (`attack.rounds`).

A federation trains for tens of rounds; attacking every update of every round costs far more than the training,
and the question a study asks is how attack success changes as the model matures. The schedule names the rounds:

    all                     every round (default)
    first, middle, last     one round: 1, R // 2 + 1, R  (R = the run's number of rounds)
    [first, last]           a list of round numbers and/or those names, e.g. [1, 10, last]
    {every: k}              round 1 and every k-th after it: 1, 1 + k, 1 + 2k, ... (add `last: true` for R too)

On the command line: `attack.rounds=last`, `attack.rounds=[first,middle,last]`, `attack.rounds={every:5}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedsim.errors import ConfigError

NAMES = ("first", "middle", "last")
ALLOWED = ("all, first, middle, last, a list of round numbers (1..R) and/or those names such as [first,last], "
           "or {every: k} (rounds 1, 1+k, 1+2k, ...; last: true adds the last round)")


@dataclass(frozen=True)
class AttackSchedule:
    """A parsed `attack.rounds`. `rounds`: round numbers and names; `every`: the step of {every: k}."""

    spec: Any = "all"
    rounds: tuple[int | str, ...] | None = None    # None: every round (or `every`)
    every: int | None = None
    with_last: bool = False

    @classmethod
    def parse(cls, spec: Any, key: str = "attack.rounds", num_rounds: int | None = None) -> "AttackSchedule":
        """Check `spec` (and, when `num_rounds` is known, that its round numbers exist); ConfigError otherwise."""
        if spec is None or spec == "all":
            schedule = cls("all")
        elif isinstance(spec, str):
            if spec not in NAMES:
                raise ConfigError(key, spec, ALLOWED)
            schedule = cls(spec, (spec,))
        elif isinstance(spec, Mapping):
            every, last = spec.get("every"), spec.get("last", False)
            if (set(spec) - {"every", "last"} or not isinstance(every, int) or isinstance(every, bool) or every < 1
                    or not isinstance(last, bool)):
                raise ConfigError(key, spec, ALLOWED)
            schedule = cls(dict(spec), None, every, last)
        elif isinstance(spec, Sequence) and spec:
            items = []
            for item in spec:
                if isinstance(item, str) and item in NAMES:
                    items.append(item)
                elif isinstance(item, int) and not isinstance(item, bool) and item >= 1:
                    items.append(item)
                else:
                    raise ConfigError(key, spec, ALLOWED)
            schedule = cls(list(spec), tuple(items))
        else:
            raise ConfigError(key, spec, ALLOWED)
        if num_rounds is not None:
            late = [r for r in (schedule.rounds or ()) if isinstance(r, int) and r > num_rounds]
            if late:
                raise ConfigError(key, spec, f"round numbers between 1 and the run's {num_rounds} rounds "
                                             f"({late[0]} is past the last)")
        return schedule

    @property
    def needs_total(self) -> bool:
        """Whether the rounds depend on the run's length (a name, or {every: k, last: true})."""
        return self.with_last or any(isinstance(r, str) for r in (self.rounds or ()))

    def resolve(self, num_rounds: int | None) -> frozenset[int] | None:
        """The attacked rounds of a run of `num_rounds` rounds; None: every round."""
        if self.rounds is None and self.every is None:
            return None
        if self.needs_total and not num_rounds:
            raise ConfigError("attack.rounds", self.spec, "a schedule without first/middle/last when the number of "
                                                          "rounds is unknown (start() was not given num_rounds)")
        if self.every is not None:
            out = set(range(1, (num_rounds or 10**9) + 1, self.every)) if num_rounds else None
            if out is None:  # unknown length: decided round by round
                return None
            if self.with_last:
                out.add(num_rounds)
            return frozenset(out)
        named = {"first": 1, "middle": middle_round(num_rounds or 1), "last": num_rounds}
        return frozenset(named[r] if isinstance(r, str) else r for r in self.rounds)

    def attacks(self, server_round: int, num_rounds: int | None) -> bool:
        """Whether `server_round` is attacked."""
        if self.every is not None and not num_rounds:
            return (server_round - 1) % self.every == 0
        chosen = self.resolve(num_rounds)
        return chosen is None or server_round in chosen


def middle_round(num_rounds: int) -> int:
    """The middle of rounds 1..R: R // 2 + 1 (3 of 5, 3 of 4, 1 of 1)."""
    return num_rounds // 2 + 1
