"""Defenses against gradient inversion. Each module registers its defense with `@register_defense`.

Layer: defenses sit beside the attacks, above data and models and the core (schema, registry, wire protocol,
seeds), below the federation. A defense brings its client mods and server hooks through its class
(`fedsim.defenses.base.Defense`); the client app composes them, so a defense never imports the apps.
"""

from fedsim.defenses.base import DEFENSES, Defense, DefenseContext, build_defense, register_defense

__all__ = ["DEFENSES", "Defense", "DefenseContext", "build_defense", "register_defense"]
