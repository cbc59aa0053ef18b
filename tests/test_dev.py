"""dev.py, the two commands of a fresh machine: `python3 dev.py test` runs the suite on 2 pytest-xdist workers,
unless its arguments choose the workers themselves."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dev():
    spec = importlib.util.spec_from_file_location("fedsim_dev_script", ROOT / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_suite_runs_on_two_workers_each_file_on_one(dev, monkeypatch):
    monkeypatch.setattr(dev.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert dev._workers([]) == ["-n", "2", "--dist", "loadfile"]       # 2 at most, whatever the cores
    assert dev._workers(["tests/test_spear.py", "-k", "noise"]) == ["-n", "2", "--dist", "loadfile"]


@pytest.mark.parametrize("args", [["-n", "0"], ["-n4"], ["-nauto"], ["--numprocesses=3"], ["-p", "no:xdist"]])
def test_arguments_that_choose_the_workers_are_left_alone(dev, args):
    assert dev._workers(args) == []


def test_one_core_runs_the_suite_in_one_process(dev, monkeypatch):
    monkeypatch.setattr(dev.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert dev._workers([]) == []
