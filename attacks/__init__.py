"""Gradient-inversion attacks. Each module registers its attack with `@register_attack`; see `fedsim.attacks.base`.

Layer: attacks sit beside the defenses, above data and models and the core (schema, registry, threat types), below
the federation. An attack never imports a defense (what both need, such as key-lock's block, lives in
`fedsim.models`) nor the federation; it sees an `Observation`, never ground truth.
"""

from fedsim.attacks.base import ATTACKS, Attack, build_attack, register_attack

__all__ = ["ATTACKS", "Attack", "build_attack", "register_attack"]
