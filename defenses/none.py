"""No defense: the client sends its update as it is."""

from fedsim.defenses.base import Defense, register_defense


@register_defense("none")
class NoDefense(Defense):
    name = "none"
