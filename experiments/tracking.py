"""Optional experiment tracking: each job that finishes is logged to TensorBoard or MLflow. Off by default.

    fedsim -m +experiment=spear_vs_defenses +tracking=tensorboard     # then: tensorboard --logdir multirun
    fedsim -m +experiment=spear_vs_defenses +tracking=mlflow tracking.uri=sqlite:///mlflow.db   # then: mlflow ui

A Hydra callback (conf/tracking/*.yaml) reads the job's own result files when it ends, so tracking sees exactly
what the report sees and a run never depends on a tracking server. Logged per round: the global model's test
accuracy and loss, and per attack the mean over attacked clients of identified, exact, recovered, psnr, ssim and
label_acc; the job's overrides as parameters (MLflow) or text (TensorBoard); its grids as artifacts (MLflow). A job skipped because it
was already complete is not logged again.

TensorBoard needs the `tensorboard` package (`pip install tensorboard`, in the `tracking` and `dev` extras);
MLflow needs `mlflow` or `mlflow-skinny` (`pip install mlflow-skinny`), not installed by default.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fedsim.errors import ConfigError
from fedsim.metrics import HEADLINE_METRICS
from fedsim.report import read_job

BACKENDS = ("tensorboard", "mlflow")
ATTACK_METRICS = HEADLINE_METRICS


def round_metrics(job: Any) -> dict[int, dict[str, float]]:
    """round -> {metric: value}: `accuracy`, `loss`, and `<attack>/<metric>` means over the round's clients."""
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for row in job.rounds:
        for key in ("accuracy", "loss"):
            if isinstance(row.get(key), (int, float)):
                out[int(row["round"])][key] = float(row[key])
    sums: dict[tuple[int, str], list[float]] = defaultdict(list)
    for rec in job.results:
        if rec.get("kind") != "attack":
            continue
        for metric in ATTACK_METRICS:
            if isinstance(rec.get(metric), (int, float)) and not isinstance(rec.get(metric), bool):
                sums[(int(rec["round"]), f"{rec['attack']}/{metric}")].append(float(rec[metric]))
    for (rnd, key), values in sums.items():
        out[rnd][key] = sum(values) / len(values)
    return dict(out)


class TrackingCallback(Callback):
    """Logs every job that ran to `backend` when it ends."""

    def __init__(self, backend: str = "tensorboard", dir: str | None = None, uri: str | None = None,
                 experiment: str | None = None) -> None:
        if backend not in BACKENDS:
            raise ConfigError("tracking.backend", backend, f"one of {', '.join(BACKENDS)}")
        self.backend, self.dir, self.uri, self.experiment = backend, dir, uri, experiment
        self._started = 0.0

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        directory = Path(str(config.hydra.runtime.output_dir))
        job = read_job(directory, directory.parent)
        if not job.state or job.state.get("started_at", 0) < self._started - 1:
            return                                             # invalid before starting, or skipped as complete
        name = str(config.hydra.job.override_dirname) or directory.name
        log = log_tensorboard if self.backend == "tensorboard" else log_mlflow
        log(job, name=name, folder=self.dir, uri=self.uri, experiment=self.experiment or _study(job))


def _study(job: Any) -> str:
    study = job.config.get("study") if isinstance(job.config.get("study"), Mapping) else {}
    return str(study.get("name") or "fedsim")


def log_tensorboard(job: Any, *, name: str, folder: str | None = None, **_: Any) -> Path:
    """Scalars per round into `folder/name` (default: the run directory's `tensorboard/`)."""
    from torch.utils.tensorboard import SummaryWriter  # optional: the tracking extra (tensorboard)

    log_dir = Path(folder) / name if folder else job.directory / "tensorboard"
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        overrides = "  \n".join(f"{k} = {v}" for k, v in job.overrides.items()) or "(no overrides)"
        writer.add_text("overrides", overrides, 0)
        writer.add_text("status", job.status, 0)
        for rnd, metrics in sorted(round_metrics(job).items()):
            for key, value in metrics.items():
                writer.add_scalar(key, value, rnd)
    finally:
        writer.close()
    return log_dir


def log_mlflow(job: Any, *, name: str, uri: str | None = None, experiment: str = "fedsim", **_: Any) -> str:
    """One MLflow run per job: overrides as params, per-round metrics with step = round, grids as artifacts."""
    import mlflow  # optional: the tracking extra (mlflow)

    if uri:
        mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in job.overrides.items()})
        mlflow.set_tag("status", job.status)
        for rnd, metrics in sorted(round_metrics(job).items()):
            mlflow.log_metrics(metrics, step=rnd)
        for grid in job.grids:
            mlflow.log_artifact(str(grid), artifact_path="grids")
        return run.info.run_id
