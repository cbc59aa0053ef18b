"""`fedsim`: the Hydra entry point. `fedsim key=value ...` runs one federation; `fedsim -m ...` a sweep.

Every config value is checked before any work, and before Hydra writes anything: a bad value prints one line
naming the key, the value and what is allowed, and exits with status 2, leaving every directory as it was (in a
sweep, a job's bad value marks that job invalid and the sweep goes on).

One run, one directory: a run locks its directory (a second run into it refuses with one line naming the first's
pid, status 2); a run into a directory that holds a finished or dead run replaces everything of the old run
(results, rounds, grids, reconstructions, .hydra, logs), so nothing of it is left to mix with the new one. A sweep
locks its sweep directory, and each job its own.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import setup_globals
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedsim.threads import parallel_jobs, prepare_process, resolve, using

prepare_process()  # OpenMP reads its wait policy once, when torch loads: before the imports below load it

from fedsim import client_app, server_app  # noqa: E402
from fedsim.config import validate  # noqa: E402
from fedsim.errors import AttackNotApplicable, ConfigError, DatasetNotFound, FedsimError, RunDirInUse  # noqa: E402
from fedsim.paths import CONF_DIR  # noqa: E402
from fedsim.protocol import OUTPUT_KEY, RUN_CONFIG_KEY  # noqa: E402
from fedsim.results import ResultsWriter, clear_run_dir, lock_run_dir, read_status  # noqa: E402
from fedsim.runtime import launch, quiet_flower  # noqa: E402
# Hydra's plugin scan re-executes the modules it finds, its own BasicSweeper's among them: it must run before
# StudySweeper subclasses BasicSweeper, or BasicSweeper's `super(BasicSweeper, self)` meets a class the scan has
# replaced (`fedsim -m` failed so in an editable install, where the scan does not see hydra_plugins.fedsim_sweeper).
Plugins.instance()
from hydra_plugins.fedsim_sweeper import StudySweeper  # noqa: E402

GROUPS = ("attack", "defense", "data", "model", "runtime", "partition", "experiment", "tracking")
EXIT_CONFIG = 2


def main() -> None:
    """Console script: check the command line (group choices, keys, values, the output directory), take the run
    directory, then hand over to Hydra."""
    prepare_process()  # done on import already (below); again in case a caller imported torch in between
    argv = sys.argv[1:]
    problem = check_group_overrides(argv)
    if problem is None:
        problem, fixed = prepare(argv)
        sys.argv[1:] = fixed
    if problem:
        print(f"fedsim: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    register_study_sweeper()
    _hydra_main()


HYDRA_FLAGS_WITHOUT_RUN = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion",
                           "-sc", "--version", "--resolve", "-p", "--package")


def prepare(argv: list[str]) -> tuple[str | None, list[str]]:
    """(one-line problem or None, the arguments to hand to Hydra) for a command line about to run.

    Composes the config as Hydra will, validates it (a single run: every value; a sweep: its directory), checks the
    output directory is writable, locks it and, for a single run, clears what an earlier run left there. The run
    (sweep) directory is resolved once here and passed to Hydra, so `${now:...}` names the directory locked.
    """
    if any(a.split("=")[0] in HYDRA_FLAGS_WITHOUT_RUN for a in argv if a.startswith("-")):
        return None, argv  # Hydra only prints something
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return None, argv  # other Hydra flags (--config-dir, ...): no pre-check, Hydra reports
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-")]
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        cfg = compose_checked(overrides, multirun)
        target = Path(str(OmegaConf.select(cfg, key))).absolute()
    except FedsimError as err:
        return str(err), argv
    problem = check_writable(key, target)
    if problem:
        return problem, argv
    if not multirun:
        problem = check_values(cfg)
        if problem:
            return problem, argv
    try:
        lock_run_dir(target)
    except FedsimError as err:
        return f"{key}: {err}", argv
    if not multirun:
        clear_run_dir(target)
    fixed = [a for a in argv if not a.lstrip("+~").startswith(key + "=")] + [f"{key}={_quoted(target)}"]
    return None, fixed


def _quoted(path: Path) -> str:
    """A path as a Hydra override value (quoted when it holds characters the override grammar reads)."""
    text = str(path)
    return text if all(c.isalnum() or c in "/._-+" for c in text) else "'" + text.replace("'", "\\'") + "'"


def compose_checked(overrides: list[str], multirun: bool) -> DictConfig:
    """The composed config (with Hydra's node) that the command line gives; sweep overrides take their first
    value. Raises FedsimError with one line for what Hydra cannot compose (e.g. an unknown key without +)."""
    setup_globals()  # registers ${now:...}
    try:
        plain = [first_value(o) for o in overrides] if multirun else overrides
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=plain, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise FedsimError(_compose_problem(err, overrides)) from None


def first_value(override: str) -> str:
    """`key=a,b` -> `key=a` (and `key=range(..)`, `glob(..)` ... -> their first value): the config of one job."""
    parsed = OverridesParser.create().parse_overrides([override])[0]
    if not parsed.is_sweep_override():
        return override
    first = next(iter(parsed.sweep_string_iterator()), None)
    prefix = override[: len(override) - len(override.lstrip("+~"))]
    return override if first is None else f"{prefix}{parsed.key_or_group}={first}"


def _compose_problem(err: Exception, overrides: list[str]) -> str:
    """Hydra's composition error as one line naming the key."""
    message = str(err)
    unknown = re.search(r"Could not override '([^']+)'", message)
    if unknown:
        key = unknown.group(1)
        arg = next((o for o in overrides if o.split("=", 1)[0] == key), key)
        value = arg.split("=", 1)[1] if "=" in arg else ""
        parent, _, _ = key.rpartition(".")
        known = _known_keys(parent, [o for o in overrides if o != arg])
        allowed = f"a known key of {parent or 'the config'}" + (f" ({', '.join(known)})" if known else "")
        try:
            shown = repr(yaml.safe_load(value))
        except yaml.YAMLError:
            shown = repr(value)
        return f"{key}={shown} is invalid: expected {allowed}; a new key needs a + in front (+{key}={value})"
    first = next((line.strip() for line in message.splitlines() if line.strip()), type(err).__name__)
    return first


def _known_keys(parent: str, overrides: list[str]) -> list[str]:
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    except Exception:  # the rest of the command line does not compose either: name no keys
        return []


def check_values(cfg: DictConfig) -> str | None:
    """One line for the first invalid value of a single run's config (as `run_job` validates it)."""
    try:
        job = OmegaConf.masked_copy(cfg, [str(k) for k in cfg.keys() if k != "hydra"])
        validate(OmegaConf.to_container(job, resolve=True))
    except (ConfigError, AttackNotApplicable, DatasetNotFound, FedsimError, ValueError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    except Exception as err:  # an interpolation that does not resolve, ...
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def register_study_sweeper() -> None:
    """Make `hydra/sweeper=study` available (Hydra's plugin scan misses it in editable installs)."""
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


def check_writable(key: str, target: Path) -> str | None:
    """A one-line problem when the run (or sweep) directory cannot be written; None when it can."""
    existing = target
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        with tempfile.NamedTemporaryFile(dir=existing):
            pass
        if existing != target:  # e.g. /proc accepts a temporary file in some places but no new directory
            probe = Path(tempfile.mkdtemp(dir=existing))
            probe.rmdir()
    except OSError as err:
        reason = err.strerror or str(err)
        return f"{key}={str(target)!r} is invalid: expected a writable directory ({reason}: {existing})"
    return None


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run_job(cfg)


def run_job(cfg: DictConfig) -> str | None:
    """Validate, then run one federation into Hydra's output directory. Returns that directory."""
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
    try:
        lock_run_dir(output)  # a sweep job (a single run holds its lock since `prepare`)
    except RunDirInUse as err:
        print(f"fedsim: hydra.run.dir: {err}", file=sys.stderr)
        if not multirun:
            sys.exit(EXIT_CONFIG)
        return output
    status = read_status(output)
    if multirun and status.get("state") == "complete" and _same_config(output, config_yaml):
        print(f"fedsim: {output} is already complete; skipped")
        return output
    launcher = OmegaConf.to_container(hc.launcher, resolve=True) if multirun and "launcher" in hc else None
    try:
        with using(resolve(run.threads, parallel_jobs(launcher))):
            launch(server_app.app, client_app.app, {RUN_CONFIG_KEY: config_yaml, OUTPUT_KEY: output}, run.runtime,
                   clients=run.fl.clients, nodes=run.nodes)
        status = read_status(output)  # a runtime may end quietly after a failed ServerApp: its status says
        if status.get("state") != "complete":
            raise FedsimError(status.get("error") or f"the run ended in state {status.get('state', 'unknown')!r}")
    except KeyboardInterrupt:
        raise
    except Exception as err:
        detail = str(err) if isinstance(err, FedsimError) else f"{type(err).__name__}: {err}"
        print(f"fedsim: the run failed: {detail}", file=sys.stderr)
        if not multirun:
            sys.exit(1)
    return output


# Keys that describe a study or how it is watched, not the run: a job finished under other values of these is
# still the same job (`study.*` only feeds other keys, whose resolved values are compared).
NOT_RESULT_KEYS = ("study", "tracking", "verbose", "threads")


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
    if path.is_dir() and all(p.name in (".hydra", "main.log", "cli.log", ".fedsim.lock") for p in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
