import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def fedsim_run(tmp_path, *overrides, name="run"):
    """Run a federation in-process (inline runtime unless overridden) into tmp_path/name."""
    from fedsim.api import run

    return run(list(overrides), tmp_path / name)
