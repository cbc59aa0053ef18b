#!/usr/bin/env python3
"""Everything on a fresh machine with only Python 3.11: `python3 dev.py demo` and `python3 dev.py test`.

Creates the virtual environment `.venv` on first use (and refreshes it when pyproject.toml changes), then runs:
  demo   the main job: SPEAR against each defense on embedded data (fedsim -m +experiment=spear_vs_defenses),
         a table, plots and image grids in multirun/spear_vs_defenses/small/report/index.html
  test   the test suite (slow studies excluded; they live in benchmarks/), on 2 pytest-xdist workers
  readme the demo's study afresh, and its table written into README.md (experiments/readme.py)
  fedsim ARGS / report ARGS / pytest ARGS   the tools themselves, inside the environment
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".fedsim-installed"


def _python311() -> str:
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    found = shutil.which("python3.11")
    if not found:
        sys.exit("fedsim needs Python 3.11 (python3.11 was not found on PATH)")
    return found


def ensure_venv() -> None:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    if not (BIN / "python").exists():
        print("creating .venv (first run: installs PyTorch, Flower, Hydra; a few minutes)", flush=True)
        subprocess.run([_python311(), "-m", "venv", str(VENV)], check=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + ["-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(digest)


def run(argv: list[str]) -> int:
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(argv, cwd=ROOT, env=env).returncode


def _workers(args: list[str]) -> list[str]:
    """`-n 2 --dist loadfile` on a machine with 2 or more cores, unless the arguments choose (`-n`, `-p no:xdist`).

    Most tests run on one torch thread (clients, SPEAR, the optimisation attacks) or wait for subprocesses (Ray,
    SuperNodes, sweeps), so two workers take the suite on 2 cores from about 22 to about 11 minutes. A file stays on
    one worker: its module fixtures (the GI-SMN prior, trained once) are built once. 3 workers on 2 cores gained
    nothing (656 s against 666 s); more than 2 on more cores is not tested (several Ray clusters and timed client
    faults side by side), so 2 is the most, whatever the cores.
    """
    chosen = any(a == "-n" or a.startswith("-n") and (a[2:].isdigit() or a[2:] in ("auto", "logical"))
                 or a.startswith("--numprocesses") or a == "no:xdist" for a in args)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return [] if chosen or cores < 2 else ["-n", "2", "--dist", "loadfile"]


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, args = sys.argv[1], sys.argv[2:]
    ensure_venv()
    if command == "demo":  # SPEAR against each defense (a resumable study) and its report: table, plots, grids
        return run([str(BIN / "fedsim"), "-m", "+experiment=spear_vs_defenses", *args])
    if command == "readme":  # README's demo table is this program's output (tests/test_readme_demo.py checks it)
        return run([str(BIN / "python"), "-m", "fedsim.experiments.readme", *args])
    if command == "test":  # one pytest-xdist worker per core (at most 2), each test file on one worker
        return run([str(BIN / "python"), "-m", "pytest", "-q", "-m", "not slow", *_workers(args), *args])
    if command in ("fedsim", "pytest"):
        return run([str(BIN / command), *args])
    if command == "report":
        return run([str(BIN / "fedsim-report"), *args])
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
