"""Running fedsim from Python (notebooks, labs, tests): the same configs and runtimes as the CLI."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf


@dataclass
class RunResult:
    """A finished run: its directory and what it recorded."""

    directory: Path
    results: list[dict] = field(default_factory=list)   # results.jsonl
    rounds: list[dict] = field(default_factory=list)    # rounds.jsonl
    status: dict = field(default_factory=dict)

    def attacks(self, attack: str | None = None) -> list[dict]:
        return [r for r in self.results if r.get("kind") == "attack" and (attack is None or r["attack"] == attack)]

    def faults(self) -> list[dict]:
        return [r for r in self.results if r.get("kind") == "fault"]


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The configuration `fedsim OVERRIDES...` would run (Hydra's compose API over `conf/`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fedsim.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run(overrides: Sequence[str] = (), output: str | Path | None = None, *, progress: bool = False) -> RunResult:
    """Run one federation like `fedsim OVERRIDES...`, into `output` (a temporary directory by default).

    As the CLI: the directory is locked while the run goes (RunDirInUse if another process holds it) and the
    outputs of an earlier run in it are replaced."""
    from fedsim.config import validate
    from fedsim.results import clear_run_dir, lock_run_dir, unlock_run_dir
    from fedsim.runtime import launch, quiet_flower
    from fedsim.threads import for_library, using

    raw = OmegaConf.to_container(compose(overrides), resolve=True)
    run_config = validate(raw)
    quiet_flower(run_config.verbose)
    directory = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="fedsim-"))
    lock_run_dir(directory)
    try:
        clear_run_dir(directory)
        with using(for_library(run_config.threads)):
            launch({"fedsim-config": yaml.safe_dump(raw, sort_keys=False), "fedsim-output": str(directory),
                    "fedsim-progress": progress}, run_config.runtime, clients=run_config.fl.clients,
                   nodes=run_config.nodes)
    finally:
        unlock_run_dir(directory)
    return load(directory)


def load(directory: str | Path) -> RunResult:
    """The records of a run directory (finished or not)."""
    from fedsim.results import ROUNDS_FILE, RESULTS_FILE, read_jsonl, read_status

    directory = Path(directory)
    return RunResult(directory, read_jsonl(directory / RESULTS_FILE), read_jsonl(directory / ROUNDS_FILE),
                     read_status(directory))
