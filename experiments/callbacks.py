"""Hydra callback of the study presets: when a sweep ends, say what finished and write its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fedsim.console import print_study
from fedsim.report import STATUSES, collect, write_report


class StudyCallback(Callback):
    """After a multirun: one line per status count, then the report (`fedsim-report`) of the sweep's folder."""

    def __init__(self, report: bool = True) -> None:
        self.report = report

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        if not self.report:
            jobs = collect(sweep_dir)
            counts = ", ".join(f"{n} {s}" for s in STATUSES if (n := sum(j.status == s for j in jobs)))
            print(f"fedsim: {len(jobs)} run(s) in {sweep_dir}: {counts}\nreport: fedsim-report {sweep_dir}")
            return
        try:
            report = write_report(sweep_dir)
        except Exception as err:  # noqa: BLE001 - the sweep's results stand even if the report cannot be drawn
            print(f"fedsim: the report failed ({type(err).__name__}: {err}); retry with: fedsim-report {sweep_dir}")
            return

        print_study(report.runs, f"{sweep_dir.name}: attack success (mean over rounds and clients) and final accuracy")
        counts = ", ".join(f"{n} {s}" for s in STATUSES if (n := sum(j.status == s for j in report.jobs)))
        print(f"fedsim: {len(report.jobs)} run(s) in {sweep_dir}: {counts}")
        print(f"report: {report.page}")
