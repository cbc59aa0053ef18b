"""Gradient-inversion attacks. Each module registers its attack with `@register_attack`; see `attacks.base`."""

from attacks.base import ATTACKS, Attack, build_attack, register_attack

__all__ = ["ATTACKS", "Attack", "build_attack", "register_attack"]
