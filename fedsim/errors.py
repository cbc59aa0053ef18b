"""Named exceptions. Each carries enough to print one line that tells the user what to change."""

from __future__ import annotations

from typing import Any


class FedsimError(Exception):
    """Base class of fedsim's own errors."""


class ConfigError(FedsimError, ValueError):
    """A configuration value is invalid: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: expected {allowed}")


class DatasetNotFound(FedsimError, FileNotFoundError):
    """A dataset that must be read from disk is not there."""


class DatasetUnreadable(FedsimError):
    """A dataset's files are there but cannot be read (corrupt or of another format)."""


class AttackNotApplicable(FedsimError):
    """An attack cannot run against this model or threat model (raised at config time)."""


class ReconstructionFailed(FedsimError):
    """An attack ran but could not produce a reconstruction."""


class RunDirInUse(FedsimError):
    """Another live process runs in the run directory (it holds the directory's lock)."""
