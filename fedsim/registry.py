"""Name -> plug-in registries for attacks, defenses, datasets, models and runtimes.

A plug-in registers itself with a decorator when its module is imported; `discover` imports every module of a
package (or the modules named), so adding an attack is one new module plus one YAML file and nothing else changes.
Every entry carries a `Config` dataclass of knobs; `Registry.build` is the one place that turns a config node
`{name: ..., <knobs>}` into (name, entry, typed config).

Core layer: imports only fedsim's errors and schema helpers.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from fedsim.errors import ConfigError
from fedsim.schema import build_config, plain

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of plug-ins of one kind, with a collision guard."""

    def __init__(self, kind: str, package: str | None = None, *, modules: tuple[str, ...] = (),
                 default: str | None = None) -> None:
        """package: every module of it registers entries; modules: these modules do (imported on first lookup);
        default: the name a node without `name` gets (None: `name` is required)."""
        self.kind = kind
        self._package = package
        self._modules = modules
        self.default = default
        self._entries: dict[str, T] = {}
        self._discovered = package is None and not modules

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({existing!r} and {obj!r})")
            self._entries[name] = obj
            return obj

        return decorator

    def _discover(self) -> None:
        if not self._discovered:
            self._discovered = True
            discover(self._package)
            for module in self._modules:
                importlib.import_module(module)

    def get(self, name: str, *, key: str | None = None) -> T:
        """The entry called `name`; a ConfigError naming `key` and the allowed names otherwise."""
        self._discover()
        if name not in self._entries:
            raise ConfigError(key or self.kind, name, f"one of {', '.join(self.names())}")
        return self._entries[name]

    @property
    def package(self) -> str | None:
        """The package whose modules register this registry's own entries (others may register more: tests)."""
        return self._package

    def build(self, node: Any, prefix: str, *, ignore: tuple[str, ...] = ()) -> tuple[str, T, Any]:
        """(name, entry, typed config) for a config node `{name: ..., <knobs>}`: the name looked up (a ConfigError
        naming `prefix.name` when unknown), the knobs checked against the entry's `Config` (keys in `ignore` are
        someone else's)."""
        values = plain(node) or {}
        if not isinstance(values, Mapping):
            raise ConfigError(prefix, values, f"a mapping with a {self.kind} name")
        name = values.get("name", self.default)
        entry = self.get(name, key=f"{prefix}.name")
        return name, entry, build_config(entry.Config, values, prefix, ignore=("name", *ignore))

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def discover(package: str | None) -> None:
    """Import every module of `package` so that their decorators run."""
    if package is None:
        return
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
