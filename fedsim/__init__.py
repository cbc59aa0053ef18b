"""fedsim: gradient-inversion attacks and defenses inside a real Flower federation.

Public entry points (imported lazily, so `import fedsim` stays cheap):

    fedsim.run([...overrides])           run one federation from Python (like the `fedsim` CLI)
    fedsim.CuriousStrategy(strategy, attacks, model_fn, threat)
                                         wrap any Flower strategy: attack every client update it aggregates
    fedsim.ThreatModel(...)              what that server is assumed to know
    fedsim.audit_mod                     client mod: send the trained batch to the scorer (simulation only)
    fedsim.audit.capture(x, y)           name a batch for the audit mod from inside a training loop
"""

from __future__ import annotations

import importlib
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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")
