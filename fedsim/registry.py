"""Name -> class registries for attacks, defenses, datasets, models and runtimes.

A plug-in registers itself with a decorator when its module is imported; `discover` imports every module of a
package, so adding an attack is one new module plus one YAML file and nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedsim.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of plug-ins of one kind, with a collision guard."""

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self._package = package
        self._entries: dict[str, T] = {}
        self._discovered = package is None

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

    def get(self, name: str, *, key: str | None = None) -> T:
        """The entry called `name`; a ConfigError naming `key` and the allowed names otherwise."""
        self._discover()
        if name not in self._entries:
            raise ConfigError(key or self.kind, name, f"one of {', '.join(self.names())}")
        return self._entries[name]

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
