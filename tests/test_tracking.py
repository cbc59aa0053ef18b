"""Optional tracking (experiments/tracking.py): off by default; +tracking=tensorboard logs a run's rounds."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_tracking_is_off_by_default():
    from fedsim.api import compose

    from hydra import compose as hydra_compose, initialize_config_dir

    from fedsim.cli import CONF_DIR

    assert "tracking" not in compose([])
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", return_hydra_config=True)
    assert "tracking" not in (cfg.hydra.callbacks or {})


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    out = tmp / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "fedsim.cli", "attack=analytic", "data=digits", "model.widths=[32]",
                           "fl.batch_size=1", "fl.clients=2", "fl.rounds=2", "+tracking=tensorboard",
                           f"hydra.run.dir={out}"], cwd=tmp, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_tensorboard_gets_accuracy_and_attack_success_per_round(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"))
    events.Reload()
    assert {"accuracy", "loss", "analytic/exact", "analytic/psnr"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("analytic/exact")] == [(1, 1.0), (2, 1.0)]
    assert [e.step for e in events.Scalars("accuracy")] == [0, 1, 2]


def test_mlflow_gets_one_run_per_job_with_params_metrics_and_grids(tracked_run, tmp_path):
    import mlflow
    from fedsim.experiments.tracking import log_mlflow
    from fedsim.report import read_job

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_mlflow(read_job(tracked_run, tracked_run.parent), name="run", uri=uri, experiment="test")
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["attack"] == "analytic" and run.data.tags["status"] == "complete"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "analytic/exact")] == [(1, 1.0), (2, 1.0)]
    assert len(client.list_artifacts(run_id, "grids")) == 4
