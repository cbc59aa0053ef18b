import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle workers sleep (fedsim.threads)

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Ray reads this when it is imported: single-machine mode keeps every Ray process on loopback (fedsim.runtime sets
# it too, but a test that imports Ray first, e.g. through Flower's run_simulation, would otherwise fix it open).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def fedsim_run(tmp_path, *overrides, name="run"):
    """Run a federation in-process (inline runtime unless overridden) into tmp_path/name."""
    from fedsim.api import run

    return run(list(overrides), tmp_path / name)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one intra-op thread for a whole module: on a 2-core machine shared with other jobs, two threads make
    small double-backward passes ~100x slower."""
    from fedsim.training import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="module")
def patches():
    """The embedded natural-image crops, 32x32 RGB."""
    from fedsim.data import load_dataset

    return load_dataset({"name": "patches", "size": 32, "channels": 3})
