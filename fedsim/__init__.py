"""fedsim: gradient-inversion attacks and defenses inside a real Flower federation.

Public entry points (imported lazily, so `import fedsim` stays cheap):

    fedsim.run([...overrides])           run one federation from Python (like the `fedsim` CLI)
    fedsim.CuriousStrategy(strategy, attacks, model_fn, threat)
                                         wrap any Flower strategy: attack every client update it aggregates
    fedsim.ThreatModel(...)              what that server is assumed to know
    fedsim.audit_mod                     client mod: send the trained batch to the scorer (simulation only)
    fedsim.audit.capture(x, y)           name a batch for the audit mod from inside a training loop

Layers, one direction (each imports only those below it; `tests/test_architecture.py` and import-linter's
contract in pyproject.toml check it, see README "Architecture"):

    CLI and Python entry points    fedsim.cli, fedsim.api
    studies and reports            fedsim.experiments, fedsim.report, fedsim.page, fedsim.plots, hydra_plugins
    runtimes                       fedsim.runtime, fedsim.deployment (they receive the apps, never import them)
    the federation                 fedsim.config (run validation), fedsim.client_app, fedsim.server_app,
                                   fedsim.hook, fedsim.strategy, fedsim.faults, fedsim.audit, fedsim.results, ...
    attacks | defenses             fedsim.attacks, fedsim.defenses (independent of each other)
    data and models                fedsim.data, fedsim.models (key-lock's block too), fedsim.training
    core                           fedsim.schema, fedsim.registry, fedsim.protocol, fedsim.seeds, fedsim.threat,
                                   fedsim.errors, fedsim.arrays, fedsim.grids, fedsim.metrics, ...

The repository keeps `attacks/`, `defenses/`, `experiments/` and `conf/` at its root; installed they are
`fedsim.attacks`, `fedsim.defenses`, `fedsim.experiments` and `fedsim.conf` (setuptools' package-dir). From a
checkout (PYTHONPATH, an editable install, a Flower app bundle) the finder below gives them the same names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run": "fedsim.api",
    "load": "fedsim.api",
    "CuriousStrategy": "fedsim.hook",
    "ThreatModel": "fedsim.hook",
    "audit_mod": "fedsim.audit",
    "make_audit_mod": "fedsim.audit",
    "Normalization": "fedsim.threat",
}

__all__ = sorted(_EXPORTS)

# fedsim.<name> -> the repository's root folder that holds it (installed, they are real subpackages of fedsim)
CHECKOUT_FOLDERS = {"fedsim.attacks": "attacks", "fedsim.defenses": "defenses", "fedsim.experiments": "experiments",
                    "fedsim.conf": "conf"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Imports `fedsim.attacks` (etc.) from a checkout's root folders, as the installed wheel lays them out."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        folder = CHECKOUT_FOLDERS.get(fullname)
        if folder is None or not (self.root / folder / "__init__.py").is_file():
            return None
        location = self.root / folder
        return importlib.util.spec_from_file_location(fullname, location / "__init__.py",
                                                      submodule_search_locations=[str(location)])


def _map_checkout() -> None:
    here = Path(__file__).resolve().parent
    if (here / "conf").is_dir():  # installed: the folders are fedsim's own subpackages
        return
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder(here.parent))


_map_checkout()


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")
