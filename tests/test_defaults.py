"""Defaults are written once: every attack's and defense's YAML under conf/ lists each knob of its `Config` with
the Python default, and nothing else (so neither can drift from the other)."""

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from fedsim.attacks.base import ATTACKS
from fedsim.defenses.base import DEFENSES
from fedsim.paths import CONF_DIR


def _defaults(cls: type) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _shipped(registry) -> list[str]:
    """The plug-ins of the registry's own package (tests register spies of their own)."""
    return [n for n in registry.names() if registry.get(n).__module__.startswith(registry.package + ".")]


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b)
    return a == b


@pytest.mark.parametrize("family, registry", [("attack", ATTACKS), ("defense", DEFENSES)])
def test_every_plugin_has_a_yaml_and_every_yaml_a_plugin(family, registry):
    files = {p.stem for p in (Path(CONF_DIR) / family).glob("*.yaml")}
    assert files == set(_shipped(registry))


@pytest.mark.parametrize("family, name", [("attack", n) for n in _shipped(ATTACKS)] +
                         [("defense", n) for n in _shipped(DEFENSES)])
def test_the_yaml_lists_every_knob_with_its_python_default(family, name):
    node = yaml.safe_load((Path(CONF_DIR) / family / f"{name}.yaml").read_text()) or {}
    assert node.get("name") == name
    cls = (ATTACKS if family == "attack" else DEFENSES).get(name)
    defaults = _defaults(cls.Config)
    knobs = {k: v for k, v in node.items() if k != "name"}
    assert set(knobs) == set(defaults), f"{family}/{name}.yaml keys differ from {cls.Config.__name__}'s fields"
    for key, value in knobs.items():
        assert _same(value, defaults[key]), f"{family}/{name}.yaml: {key}={value!r}, Python default {defaults[key]!r}"
