"""Hydra sweeper for fedsim studies: Hydra's basic sweeper over a union of grids (`fedsim.experiments.sweeps`).

Selected with `hydra/sweeper: study` (conf/hydra/sweeper/study.yaml). It lives in `hydra_plugins` because Hydra
instantiates sweepers only from that package; `fedsim.cli` registers it explicitly too, since editable installs
hide namespace packages from Hydra's plugin scan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from fedsim.experiments.sweeps import study_jobs


class StudySweeper(BasicSweeper):
    """Runs `params` x each arm of `arms` (see `fedsim.experiments.sweeps.study_jobs`), in batches of `max_batch_size`."""

    def __init__(self, max_batch_size: int | None = None, params: dict | None = None,
                 arms: dict | None = None) -> None:
        super().__init__(max_batch_size, params)
        self.arms = arms

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = study_jobs(self.params, self.arms, arguments, parser)
        self.overrides = list(self.split_overrides_to_chunks(jobs, self.max_batch_size))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns = []
        initial_job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            for r in results:
                _ = r.return_value  # raises if the job raised
            initial_job_idx += len(batch)
            returns.append(results)
        return returns
