"""The thread policy (fedsim/threads.py): one count per process, from `threads` and the launcher, checked at the door;
the count changes no bit of a small attack and only the last bits of a large gradient."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from fedsim.attacks.base import build_attack
from fedsim.attacks.matching import model_gradients
from fedsim.api import compose
from fedsim.config import validate
from fedsim.errors import ConfigError
from fedsim.models import build_model
from fedsim.threads import THREAD_VARS, ThreadPlan, chosen, for_library, parallel_jobs, resolve, using
from fedsim.threat import Observation, TrainMeta

SHAPE = (3, 32, 32)
JOBLIB = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}
BASIC = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}


def test_a_job_alone_gets_every_core_and_parallel_jobs_share_them():
    assert resolve(None, 1, cores=8, environ={}).threads == 8
    assert resolve(None, 2, cores=8, environ={}).threads == 4
    assert resolve(None, 2, cores=2, environ={}).threads == 1
    assert resolve(None, 3, cores=2, environ={}).threads == 1        # never zero
    assert resolve(None, 1, cores=8, environ={"OMP_NUM_THREADS": "3"}).threads == 3   # the user's (or joblib's)
    assert resolve(None, 1, cores=8, environ={"OMP_NUM_THREADS": "0"}).threads == 8   # not a count: ignored
    assert resolve(5, 2, cores=2, environ={"OMP_NUM_THREADS": "1"}) == ThreadPlan(5, "threads=5")   # the knob wins


def test_parallel_jobs_are_read_from_the_joblib_launcher_as_joblib_counts_them():
    assert parallel_jobs(JOBLIB, cores=8) == 2
    assert parallel_jobs({**JOBLIB, "n_jobs": -1}, cores=8) == 8
    assert parallel_jobs({**JOBLIB, "n_jobs": -2}, cores=8) == 7
    assert parallel_jobs(BASIC, cores=8) == 1 and parallel_jobs(None) == 1


def test_the_parallel_launcher_config_divides_the_cores():
    from fedsim.cli import compose_checked

    cfg = compose_checked(["hydra/launcher=parallel", "seed=0,1"], multirun=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert parallel_jobs(launcher, cores=2) == 2
    assert resolve(None, parallel_jobs(launcher, cores=2), cores=2, environ={}).threads == 1


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "true"])
def test_a_bad_thread_count_is_refused_at_the_door_naming_the_key(value):
    raw = OmegaConf.to_container(compose([f"threads={value}"]), resolve=True)
    with pytest.raises(ConfigError, match=r"^threads=.* is invalid: expected null \(automatic.*or an integer >= 1"):
        validate(raw, deep=False)
    assert validate(OmegaConf.to_container(compose(["threads=3"]), resolve=True), deep=False).threads == 3


def test_fedsim_run_keeps_the_callers_setting_unless_told():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert for_library(None).threads == 1 and for_library(2).threads == 2
    finally:
        torch.set_num_threads(before)


def test_a_plan_holds_for_its_block_and_a_nested_one_keeps_it():
    before, env = torch.get_num_threads(), {k: os.environ.get(k) for k in THREAD_VARS}
    with using(ThreadPlan(1, "test")) as plan:
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        with using(ThreadPlan(2, "inner")) as inner:   # e.g. the ServerApp inside an inline run
            assert inner is plan and torch.get_num_threads() == 1
        assert chosen() is plan
    assert torch.get_num_threads() == before and chosen() is None
    assert {k: os.environ.get(k) for k in THREAD_VARS} == env


def _observation(patches, model_node, idx):
    model = build_model(model_node, SHAPE, patches.num_classes, 0)
    x, y = patches.train_x[idx], patches.train_y[idx]
    update = {k: v.detach() for k, v in model_gradients(model, x, y, create_graph=False).items()}
    meta = TrainMeta("fedsgd", SHAPE, patches.num_classes, patches.normalization, batch_size=len(idx))
    return Observation(0, 0, model, update, meta)


def test_dlg_on_lenet_gives_the_same_bits_on_one_and_two_threads(patches):
    # every reduction of this problem is under torch's parallel grain: the thread count changes no arithmetic
    obs = _observation(patches, {"name": "lenet"}, [200])
    runs = []
    for threads in (1, 2):
        with using(ThreadPlan(threads, "test")):
            rec = build_attack({"name": "dlg", "iterations": 40}).reconstruct(obs)
        runs.append(rec)
    assert torch.equal(runs[0].inputs, runs[1].inputs)
    assert runs[0].matching_loss == runs[1].matching_loss


def test_a_large_gradient_agrees_to_rounding_on_one_and_two_threads(patches):
    # ResNet-18 on 4 images: convolution weight gradients and sums over >32k elements are split per thread
    model = build_model({"name": "resnet18"}, SHAPE, patches.num_classes, 0)
    x, y = patches.train_x[:4], patches.train_y[:4]
    grads = []
    for threads in (1, 2):
        with using(ThreadPlan(threads, "test")):
            grads.append(model_gradients(model, x, y, create_graph=False))
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-6 * float(g.abs().max())), name


def test_processes_started_in_a_child_env_get_its_count_and_a_sleeping_wait_policy(monkeypatch):
    from fedsim.threads import child_env

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with child_env(1):
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert os.environ["OMP_NUM_THREADS"] == "2" and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")   # the user's choice stands
    with child_env(1):
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
