"""Defenses against gradient inversion. Each module registers its defense with `@register_defense`."""

from defenses.base import DEFENSES, Defense, DefenseContext, build_defense, register_defense

__all__ = ["DEFENSES", "Defense", "DefenseContext", "build_defense", "register_defense"]
