"""What a study sweeps: a union of grids ("arms"), each the Cartesian product of its own values.

Hydra's basic sweeper runs one Cartesian product. A study comparing defenses needs several: every defense over
its own strength knob (noise over `defense.sigma`, pruning over `defense.keep`, ...), which no single product
gives without invalid jobs. `study_jobs` expands

    params:    keys swept in every arm            {"seed": "0,1"}
    arms:      name -> keys of that arm           {"noise": {"defense": "noise", "defense.sigma": "0,0.1"},
                                                   "none": {"defense": "none"}}
    arguments: the command line's overrides       ["fl.rounds=2", "defense.sigma=0,1,10"]

into one override list per job. A command-line key that some arms set replaces it in those arms only (so
`defense.sigma=0,1,10` rescales the noise arm and leaves pruning alone); any other command-line key applies to
every arm. An arm set to null is left out (`hydra.sweeper.arms.pruning=null`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


def study_jobs(params: Mapping[str, Any] | None, arms: Mapping[str, Mapping[str, Any] | None] | None,
               arguments: Sequence[str], parser: Any) -> list[list[str]]:
    """One list of overrides per job, arms in order, duplicates (the same overrides) dropped.

    `parser` is Hydra's `OverridesParser` (it knows sweep syntax: `a,b`, `range(...)`, `choice(...)`).
    """
    common = [f"{k}={v}" for k, v in (params or {}).items()]
    args = parser.parse_overrides(list(arguments))
    if not arms:
        groups = [parser.parse_overrides(common) + args]
    else:
        arm_overrides = {name: parser.parse_overrides([f"{k}={v}" for k, v in arm.items()])
                         for name, arm in arms.items() if arm is not None}
        armed_keys = {o.key_or_group for overrides in arm_overrides.values() for o in overrides}
        groups = []
        for overrides in arm_overrides.values():
            own = {o.key_or_group for o in overrides}
            mine = [a for a in args if a.key_or_group in own or a.key_or_group not in armed_keys]
            groups.append(parser.parse_overrides(common) + overrides + mine)
    jobs: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for overrides in groups:
        for job in BasicSweeper.split_arguments(overrides, None)[0]:
            key = tuple(sorted(job))
            if key not in seen:
                seen.add(key)
                jobs.append(job)
    return jobs
