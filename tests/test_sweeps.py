"""Sweeps: the study sweeper's union of grids, parallel jobs, and resuming an interrupted sweep."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEAD_PID = 2**31 - 2  # above any pid_max: no such process
TINY = ("attack=analytic", "data=digits", "model.widths=[32]", "fl.clients=2", "fl.rounds=2")


def fedsim_cmd(*args):
    return [sys.executable, "-m", "fedsim.cli", *args]


def env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "FLWR_TELEMETRY_ENABLED": "0"}


def fedsim(*args, cwd, timeout=300):
    return subprocess.run(fedsim_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env())


def status(job: Path) -> dict:
    path = job / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def jobs_parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


# --- the study sweeper -------------------------------------------------------------------------------------------

def test_a_study_is_the_union_of_its_arms_each_a_grid():
    from fedsim.experiments.sweeps import study_jobs

    arms = {"none": {"defense": "none"},
            "noise": {"defense": "noise", "defense.sigma": "0,0.1"},
            "pruning": {"defense": "pruning", "defense.keep": "0.5"}}
    jobs = study_jobs({"seed": "0,1"}, arms, [], jobs_parser())
    assert len(jobs) == 2 * (1 + 2 + 1)
    assert ["seed=0", "defense=noise", "defense.sigma=0.1"] in jobs
    assert not any("defense=pruning" in j and any(o.startswith("defense.sigma") for o in j) for j in jobs)


def test_a_command_line_key_replaces_it_only_in_the_arms_that_sweep_it():
    from fedsim.experiments.sweeps import study_jobs

    arms = {"noise": {"defense": "noise", "defense.sigma": "0,0.1"}, "pruning": {"defense": "pruning",
                                                                                "defense.keep": "0.5"},
            "secagg": None}                                        # an arm set to null is left out
    jobs = study_jobs({}, arms, ["defense.sigma=1,2,3", "fl.rounds=4"], jobs_parser())
    assert sorted(j[1] for j in jobs if "defense=noise" in j) == ["defense.sigma=1", "defense.sigma=2",
                                                                  "defense.sigma=3"]
    assert [j for j in jobs if "defense=pruning" in j] == [["defense=pruning", "defense.keep=0.5", "fl.rounds=4"]]
    assert all("fl.rounds=4" in j for j in jobs) and not any("defense=secagg" in j for j in jobs)


def test_without_arms_the_study_sweeper_is_hydras_cartesian_product():
    from fedsim.experiments.sweeps import study_jobs

    jobs = study_jobs({"a": "1,2"}, None, ["b=x,y"], jobs_parser())
    assert jobs == [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]


# --- resuming ----------------------------------------------------------------------------------------------------

def run_until_a_job_completes_then_kill(args, cwd: Path, jobs: list[Path]) -> None:
    """Start `fedsim ARGS`, wait until one of `jobs` is complete, then SIGKILL the sweep and all its workers."""
    proc = subprocess.Popen(fedsim_cmd(*args), cwd=cwd, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not any(status(job).get("state") == "complete" for job in jobs):
            assert proc.poll() is None and time.monotonic() < deadline, "no job completed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)                         # no chance to write anything more
        proc.wait(timeout=30)
        from fedsim.results import process_alive

        workers = {status(job).get("pid") for job in jobs} - {None}
        while any(process_alive(pid) for pid in workers):        # SIGKILL lands within moments, not at once
            assert time.monotonic() < deadline + 30, "a killed worker is still alive"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_an_interrupted_study_finishes_only_the_missing_jobs(tmp_path):
    """A preset sweep in parallel worker processes (joblib), killed once a job is complete: the same
    command again runs only the jobs that had not completed, and ends with the study's report."""
    args = ("-m", "+experiment=one_sample", "fl.batch_size=1,2,4", "fl.rounds=1",
            "hydra/launcher=parallel")
    folder = tmp_path / "multirun" / "one_sample" / "small"
    jobs = {b: folder / f"fl.batch_size={b},fl.rounds=1,seed=0" for b in (1, 2, 4)}
    run_until_a_job_completes_then_kill(args, tmp_path, list(jobs.values()))
    before = {b: status(j) for b, j in jobs.items()}
    done = [b for b in jobs if before[b].get("state") == "complete"]
    assert len(done) < 3, "the sweep finished before it was killed"

    from fedsim.report import collect

    labels = {job.name.split("/")[-1]: job.status for job in collect(folder)}
    expected = {jobs[b].name: "complete" if b in done else "incomplete" for b in jobs}
    assert {name: labels.get(name, "incomplete") for name in expected} == expected, before

    again = fedsim(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already complete; skipped") == len(done)
    assert all(status(jobs[b])["started_at"] == before[b]["started_at"] for b in done)   # not run again
    after = {b: status(j) for b, j in jobs.items()}
    assert all(s["state"] == "complete" for s in after.values())
    assert len({s["pid"] for b, s in after.items() if b not in done}) == 3 - len(done)   # parallel workers
    assert "3 complete" in again.stdout and (folder / "report" / "index.html").exists()


def test_a_plain_sweep_resumes_when_run_again_in_the_same_hydra_sweep_dir(tmp_path):
    """Hydra's default sweep folder is timestamped: resuming a plain `fedsim -m` means naming its folder."""
    sweep = tmp_path / "sweep"
    args = ("-m", *TINY, "fl.batch_size=1,2", f"hydra.sweep.dir={sweep}")
    first = fedsim(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    started = {n: status(sweep / n)["started_at"] for n in ("0", "1")}
    killed = status(sweep / "1") | {"state": "running", "pid": DEAD_PID}   # as if killed mid-run
    (sweep / "1" / "status.json").write_text(json.dumps(killed))
    again = fedsim(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already complete; skipped") == 1
    assert status(sweep / "0")["started_at"] == started["0"]
    assert status(sweep / "1")["started_at"] > started["1"] and status(sweep / "1")["state"] == "complete"


def test_a_finished_job_counts_as_done_only_under_the_same_config(tmp_path):
    from fedsim.cli import _same_config

    (tmp_path / "config.yaml").write_text("seed: 0\nfl: {rounds: 2}\nstudy: {name: a, scale: small}\n")
    assert _same_config(str(tmp_path), "seed: 0\nfl: {rounds: 2}\nstudy: {name: a, scale: full}\n")
    assert not _same_config(str(tmp_path), "seed: 0\nfl: {rounds: 3}\nstudy: {name: a, scale: small}\n")
    assert not _same_config(str(tmp_path / "missing"), "seed: 0\n")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_job_of_every_preset_is_a_valid_config(preset):
    """Each preset's jobs compose and pass validation (knob names and ranges), without running them."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fedsim.experiments.sweeps import study_jobs
    from fedsim.cli import CONF_DIR, check_group_overrides, register_study_sweeper
    from fedsim.config import validate

    register_study_sweeper()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={preset}"], return_hydra_config=True)
        sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
        jobs = study_jobs(sweeper.get("params"), sweeper.get("arms"), [], jobs_parser())
        assert jobs, f"{preset} sweeps nothing"
        missing = [p for job in jobs if (p := check_group_overrides(job))]
        assert not missing, f"{preset} names what conf/ lacks: {missing[0]}"
        for job in jobs:
            job_cfg = compose("config", overrides=[f"+experiment={preset}", *job])
            validate(OmegaConf.to_container(job_cfg, resolve=True), deep=False)
