"""`fedsim`: the Hydra entry point. `fedsim key=value ...` runs one federation; `fedsim -m ...` a sweep.

Every config value is checked before any work. A bad value prints one line naming the key, the value and what is
allowed, and exits with status 2 (in a sweep the job is marked invalid and the sweep goes on).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
GROUPS = ("attack", "defense", "data", "model", "runtime", "partition", "experiment", "tracking")
EXIT_CONFIG = 2


def main() -> None:
    """Console script: check group choices on the command line, then hand over to Hydra."""
    problem = check_group_overrides(sys.argv[1:]) or check_output_dir(sys.argv[1:])
    if problem:
        print(f"fedsim: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    register_study_sweeper()
    _hydra_main()


def register_study_sweeper() -> None:
    """Make `hydra/sweeper=study` available (Hydra's plugin scan misses it in editable installs)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.fedsim_sweeper import StudySweeper

    Plugins.instance().register(StudySweeper)


def group_options(group: str) -> list[str]:
    folder = Path(CONF_DIR) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def check_group_overrides(argv: list[str]) -> str | None:
    """A one-line problem for the first `group=option` override naming an option that does not exist."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in GROUPS or not value or value.startswith(("glob(", "range(", "choice(", "interval(")):
            continue
        options = group_options(key)
        for choice in value.strip("[]").split(","):
            choice = choice.strip()
            if choice and choice != "null" and choice not in options:
                return f"{key}={choice!r} is invalid: expected one of {', '.join(options)}"
    return None


def check_output_dir(argv: list[str]) -> str | None:
    """A one-line problem when the run (or sweep) directory cannot be written; None when it can or is unknown."""
    import tempfile

    overrides = [a for a in argv if not a.startswith("-")]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    try:
        from hydra import compose, initialize_config_dir
        from hydra.core.utils import setup_globals

        setup_globals()  # registers ${now:...}
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        target = Path(str(OmegaConf.select(cfg, key))).absolute()
    except Exception:  # let Hydra report whatever it cannot compose
        return None
    existing = target
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        with tempfile.NamedTemporaryFile(dir=existing):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        return f"{key}={str(target)!r} is invalid: expected a writable directory ({reason}: {existing})"
    return None


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run_job(cfg)


def run_job(cfg: DictConfig) -> str | None:
    """Validate, then run one federation into Hydra's output directory. Returns that directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fedsim.config import validate
    from fedsim.errors import AttackNotApplicable, ConfigError, DatasetNotFound, FedsimError
    from fedsim.results import ResultsWriter, read_status
    from fedsim.runtime import launch, quiet_flower

    hc = HydraConfig.get()
    output = hc.runtime.output_dir
    multirun = hc.mode == RunMode.MULTIRUN
    raw = OmegaConf.to_container(cfg, resolve=False)
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
        run = validate(raw)
    except (ConfigError, AttackNotApplicable, DatasetNotFound, FedsimError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"fedsim: {message}", file=sys.stderr)
        if multirun:
            writer = ResultsWriter(output)
            writer.start(yaml.safe_dump(raw, sort_keys=False), 0)
            writer.finish("invalid", error=message)
            return output
        _remove_if_empty(output)
        sys.exit(EXIT_CONFIG)
    quiet_flower(run.verbose)
    config_yaml = yaml.safe_dump(raw, sort_keys=False)
    status = read_status(output)
    if multirun and status.get("state") == "complete" and _same_config(output, config_yaml):
        print(f"fedsim: {output} is already complete; skipped")
        return output
    try:
        launch({"fedsim-config": config_yaml, "fedsim-output": output}, run.runtime, clients=run.fl.clients)
    except KeyboardInterrupt:
        raise
    except Exception as err:
        print(f"fedsim: the run failed: {type(err).__name__}: {err}", file=sys.stderr)
        if not multirun:
            sys.exit(1)
    return output


# Keys that describe a study or how it is watched, not the run: a job finished under other values of these is
# still the same job (`study.*` only feeds other keys, whose resolved values are compared).
NOT_RESULT_KEYS = ("study", "tracking", "verbose")


def _same_config(output: str, config_yaml: str) -> bool:
    path = Path(output) / "config.yaml"
    if not path.exists():
        return False
    old, new = yaml.safe_load(path.read_text()) or {}, yaml.safe_load(config_yaml) or {}
    strip = lambda cfg: {k: v for k, v in cfg.items() if k not in NOT_RESULT_KEYS}
    return strip(old) == strip(new)


def _remove_if_empty(output: str) -> None:
    """Remove a run directory holding nothing but Hydra's own files (no result may look half-made)."""
    path = Path(output)
    if path.is_dir() and all(p.name in (".hydra", "main.log", "cli.log") for p in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
