"""fedsim: gradient-inversion attacks and defenses inside a real Flower federation."""

__version__ = "0.1.0"
