"""How many threads torch computes with in this process: chosen once per run, from `threads` and the launcher.

One process runs a job's server side: the attacks, their scoring and the server's evaluation. It gets

- `threads=N`: N; else OMP_NUM_THREADS when the environment sets it;
- one of k jobs a sweep runs in parallel (`hydra/launcher=parallel`, joblib's `n_jobs=k`): cores // k, at least 1;
- alone: the cores this process may use (its CPU affinity).

That is the CLI's choice (`fedsim ...`, one process per job), passed on to the processes a job starts in
OMP_NUM_THREADS. `fedsim.run` from Python, and a ServerApp in a process of its own (`flwr run`), keep the process's
torch setting unless `threads=N` is given: the caller owns its process.

Clients train on one thread whatever this says (`fedsim.training.single_thread`: their update is the same bits on
every runtime), and so does SPEAR; Ray gives each client actor its reserved CPUs.

Why the wait policy matters as much as the count: torch's CPU kernels (ATen, oneDNN, MKL) share GNU OpenMP,
whose idle workers spin at every barrier by default. On a machine busy with other work a spinning worker holds
the core its partner needs, and every small kernel waits for a scheduler slice: DLG on LeNet took 11-14 s on
2 threads against 2 s on one (2 cores, load 2.6). With `OMP_WAIT_POLICY=PASSIVE` idle workers sleep, and the
same run takes 2.0-2.4 s on 2 threads. OpenMP reads the variable once, when torch is loaded, so the CLI sets it
before importing torch (`prepare_process`); a user's own setting wins.

Whether the count changes results: below torch's parallel grain (32,768 elements per reduction) every kernel
runs the same arithmetic on any count, so small problems (DLG on LeNet, one image) give the same bits. Larger
reductions (a sum over more elements, a convolution's weight gradient) are split per thread, so their last bits
depend on the count and an optimisation attack, which iterates them, can end at a nearby but different
reconstruction. `threads=N` fixes the count, and with it the bits, on any launcher.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fedsim.errors import ConfigError

log = logging.getLogger("fedsim")

WAIT_POLICY = "OMP_WAIT_POLICY"
# Read by the thread pools of child processes (joblib workers, Ray actors, a deployment's app processes).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class ThreadPlan:
    """The thread count of this process's compute, and why (for the log)."""

    threads: int
    reason: str


def available_cores() -> int:
    """The cores this process may run on (its affinity mask; all of the machine's where there is none)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_threads(value: Any) -> int | None:
    """The `threads` config value: null (automatic) or an integer >= 1. Raises ConfigError naming it otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError("threads", value, f"null (automatic: OMP_NUM_THREADS if set, else this machine's "
                                            f"{available_cores()} cores, divided among a parallel sweep's jobs) "
                                            "or an integer >= 1")
    return value


def resolve(requested: int | None, parallel_jobs: int = 1, cores: int | None = None,
            environ: Mapping[str, str] | None = None) -> ThreadPlan:
    """The thread count of one job: `requested` when given, else OMP_NUM_THREADS when the environment sets it (the
    user, or joblib for its workers), else `cores` divided among `parallel_jobs`."""
    cores = cores or available_cores()
    if requested is not None:
        return ThreadPlan(check_threads(requested), f"threads={requested}")
    omp = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "")
    if omp.strip().isdigit() and int(omp) >= 1:
        return ThreadPlan(int(omp), f"OMP_NUM_THREADS={int(omp)}")
    if parallel_jobs > 1:
        return ThreadPlan(max(1, cores // parallel_jobs), f"1 of {parallel_jobs} parallel jobs on {cores} cores")
    return ThreadPlan(cores, f"alone on {cores} cores")


def for_library(requested: int | None) -> ThreadPlan:
    """From Python (`fedsim.run`, a ServerApp's own process): `threads=N` when given, else the process's torch
    setting. The caller owns its process (a notebook, a test module on one thread); the CLI owns its own and
    applies `resolve`."""
    if requested is not None:
        return resolve(requested)
    import torch

    return ThreadPlan(torch.get_num_threads(), "the calling process's torch setting")


def parallel_jobs(launcher: Mapping[str, Any] | None, cores: int | None = None) -> int:
    """How many jobs Hydra's `launcher` node runs at once: joblib's `n_jobs` (-1: one per core; -2: all but one,
    as joblib reads it), 1 for the basic launcher (jobs in turn) or none."""
    if not launcher or "n_jobs" not in launcher or "joblib" not in str(launcher.get("_target_", "")).lower():
        return 1
    n_jobs = launcher.get("n_jobs")
    if not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or n_jobs == 0:
        return 1
    cores = cores or available_cores()
    return max(1, n_jobs if n_jobs > 0 else cores + 1 + n_jobs)


def prepare_process() -> None:
    """Before torch is imported: idle OpenMP workers sleep instead of spinning (unless the user chose a policy)."""
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")


_chosen: ThreadPlan | None = None
_interop_set = False


def chosen() -> ThreadPlan | None:
    """The plan this process runs under (None: none applied yet)."""
    return _chosen


@contextlib.contextmanager
def using(plan: ThreadPlan) -> Iterator[ThreadPlan]:
    """Run the block with torch on `plan.threads` (and the processes it starts told the same); restore after.

    A process that already runs under a plan keeps it: a ServerApp started by a runtime inside this process does
    not choose again."""
    global _chosen
    if _chosen is not None:
        yield _chosen
        return
    import torch

    before = torch.get_num_threads()
    env_before = {name: os.environ.get(name) for name in THREAD_VARS}
    torch.set_num_threads(plan.threads)
    _set_interop(plan.threads)
    os.environ.update({name: str(plan.threads) for name in THREAD_VARS})
    _chosen = plan
    log.debug("torch threads: %d (%s)", plan.threads, plan.reason)
    try:
        yield plan
    finally:
        _chosen = None
        torch.set_num_threads(before)
        for name, value in env_before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def child_env(threads: int) -> Iterator[None]:
    """Processes started in the block (e.g. Ray's workers) run `threads` OpenMP threads that sleep when idle."""
    names = (*THREAD_VARS, WAIT_POLICY)
    before = {name: os.environ.get(name) for name in names}
    os.environ.update({name: str(threads) for name in THREAD_VARS})
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _set_interop(threads: int) -> None:
    """torch's inter-op pool can be sized once per process, before it first runs work; later calls raise."""
    global _interop_set
    if _interop_set:
        return
    _interop_set = True
    import torch

    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already started (or set): it keeps its size
        pass
