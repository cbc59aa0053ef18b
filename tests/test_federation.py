"""Federations end to end (inline runtime): training, recording, determinism, FedAvg."""

import json

import pytest
import torch

from tests.conftest import fedsim_run


def test_the_same_config_and_seed_give_identical_results_twice(tmp_path):
    args = ("attack=analytic", "fl.batch_size=2", "fl.rounds=2", "data=digits", "model.widths=[32]")
    a = fedsim_run(tmp_path, *args, name="a")
    b = fedsim_run(tmp_path, *args, name="b")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(a.results) == strip(b.results)
    assert strip(a.rounds) == strip(b.rounds)
    c = fedsim_run(tmp_path, *args, "seed=1", name="c")
    assert strip(a.rounds) != strip(c.rounds)


def test_fedsgd_training_improves_the_global_model(tmp_path):
    r = fedsim_run(tmp_path, "data=digits", "model.widths=[64]", "fl.rounds=8", "fl.batch_size=32", "fl.lr=0.5",
                   "attack=analytic", "attack.targets=1")
    acc = [row["accuracy"] for row in r.rounds]
    assert acc[-1] > acc[0] + 0.3
    assert {a["client"] for a in r.attacks()} == {0}          # attack.targets=1: only client 0


def test_fedavg_observes_the_weight_delta_and_one_step_inverts_exactly(tmp_path):
    r = fedsim_run(tmp_path, "fl.mode=fedavg", "fl.local_steps=1", "fl.batch_size=1", "attack=analytic",
                   "fl.rounds=2", "data=digits")
    # one local step: the delta is -lr * gradient, so dividing by -lr recovers the gradient and the sample
    assert all(a["exact"] == 1.0 for a in r.attacks())


def test_fedavg_many_steps_is_recorded_honestly(tmp_path):
    r = fedsim_run(tmp_path, "fl.mode=fedavg", "fl.local_steps=4", "fl.batch_size=1", "attack=analytic",
                   "fl.rounds=1", "data=digits")
    rows = r.attacks()
    assert all(a["batch"] == 4 for a in rows)                   # truth = the 4 samples seen in 4 steps
    assert all(a["exact"] < 1.0 for a in rows)


def test_clients_per_round_samples_reproducibly(tmp_path):
    a = fedsim_run(tmp_path, "fl.clients=6", "fl.clients_per_round=2", "fl.rounds=3", "attack=analytic",
                   "fl.batch_size=1", "data=digits", name="a")
    per_round = {}
    for row in a.attacks():
        per_round.setdefault(row["round"], set()).add(row["client"])
    assert all(len(c) == 2 for c in per_round.values()) and len(set(map(frozenset, per_round.values()))) > 1
    b = fedsim_run(tmp_path, "fl.clients=6", "fl.clients_per_round=2", "fl.rounds=3", "attack=analytic",
                   "fl.batch_size=1", "data=digits", name="b")
    assert [(r["round"], r["client"]) for r in a.attacks()] == [(r["round"], r["client"]) for r in b.attacks()]


def test_synthetic_vectors_run_and_are_scored_without_ssim(tmp_path):
    r = fedsim_run(tmp_path, "data=synthetic", "fl.batch_size=1", "attack=analytic", "fl.rounds=1")
    assert all(a["exact"] == 1.0 and a["ssim"] is None for a in r.attacks())


@pytest.mark.parametrize("mode", ["fedsgd", "fedavg"])
def test_the_server_sees_every_buffer_a_client_sends_and_none_it_keeps(tmp_path, mode):
    """BatchNorm statistics reach the attacker's Observation; with fl.send_buffers=false they are really not sent
    (the observation holds none) and aggregation keeps the server's own."""
    import tests.spies as spies

    common = ["data=digits", "model.widths=[16,16]", "defense=keylock", "defense.key_dim=8",
              "defense.client_evaluation=false", "attack=keylock_stats", "attack.name=spy_buffers", "fl.clients=2", "fl.rounds=2",
              f"fl.mode={mode}"]
    spies.BUFFERS_SEEN.clear()
    sent = fedsim_run(tmp_path, *common, name="sent")
    assert sent.status["state"] == "complete" and not sent.faults()
    names = {k for _, _, buffers in spies.BUFFERS_SEEN for k in buffers}
    assert {"net.1.norm.running_mean", "net.1.norm.running_var"} <= names
    assert all(not torch.equal(b["net.1.norm.running_mean"], torch.zeros(16)) for _, _, b in spies.BUFFERS_SEEN)
    spies.BUFFERS_SEEN.clear()
    kept = fedsim_run(tmp_path, *common, "fl.send_buffers=false", name="kept")
    assert kept.status["state"] == "complete" and not kept.faults()
    assert len(spies.BUFFERS_SEEN) == 4 and all(b == {} for _, _, b in spies.BUFFERS_SEEN)


# --- SPEAR's large batches in the federation (README, "SPEAR at full strength": large batches) -------------------

def spear_large_batch_rows(tmp_path, *overrides):
    run = fedsim_run(tmp_path, "attack=spear", "attack.solver=auto", *overrides)
    assert run.status["state"] == "complete" and not run.faults()
    return run.attacks()


def test_spear_takes_every_clients_batch_of_32_apart_exactly_in_the_federation(tmp_path):
    """Default data and model (32x32 crops, first layer 1000 wide), FedSGD, batches of 32 beyond the sampling
    search's reach: auto takes the large-batch search, and the client's batch comes back exact and certified
    (one client keeps the default suite short; the slow test below runs the default 4 at b = 64)."""
    rows = spear_large_batch_rows(tmp_path, "fl.batch_size=32", "fl.clients=1", "fl.rounds=1")
    assert [(r["round"], r["client"]) for r in rows] == [(1, 0)]
    for row in rows:
        assert row["batch"] == 32 and row["returned"] == 32
        assert row["stats"]["solver"] == "dictionary" and row["stats"]["stop_reason"] == "certified"
        assert row["exact"] == 1.0 and row["certified"] and row["psnr"] >= 99


def test_a_fedavg_update_holding_a_near_duplicate_is_not_certified_wrong(tmp_path):
    """FedAvg, two local steps on batches of 16 (32 distinct samples; two of them at cosine 0.97): the large-batch
    search gets 31 of 32 exact, and the 32nd comes back 6.9% off. It used to be certified with an estimated error of
    6.7e-6; the estimate now counts only zero rows that the recovered sample confirms, finds that sample unpinned
    (about 6%) and does not certify (`stop_reason: unpinned`)."""
    rows = spear_large_batch_rows(tmp_path, "fl.mode=fedavg", "fl.local_steps=2", "fl.batch_size=16", "fl.clients=1",
                                  "fl.rounds=1", "attack.max_seconds=600")
    [row] = rows
    assert row["returned"] == 32 and row["exact"] >= 31 / 32
    assert row["certified"] == (row["exact"] == 1.0)
    if row["exact"] < 1.0:
        assert row["stats"]["sample_error_max"] > 1e-4 and row["stats"]["stop_reason"] == "unpinned"


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_spear_takes_every_clients_batch_of_64_apart_exactly_in_the_federation(tmp_path):
    """README's command: `fedsim attack=spear attack.solver=auto fl.batch_size=64 fl.rounds=1
    attack.max_seconds=null`: the default 4 clients attacked on the fresh model, the budget counted in samples
    rather than timed, so the answer is the same on any machine. Measured: 4 of 4 exact and certified, 16640 to
    35328 proposed points each, 11-13 min in all on 2 cores at load 6-8. (Rounds 2 and 3 of the default 3-round
    run are harder: README says what they gave.)"""
    rows = spear_large_batch_rows(tmp_path, "fl.batch_size=64", "fl.rounds=1", "attack.max_seconds=null")
    assert [(r["round"], r["client"]) for r in rows] == [(1, c) for c in range(4)]
    for row in rows:
        assert row["batch"] == 64 and row["stats"]["solver"] == "dictionary"
        assert row["exact"] == 1.0 and row["certified"], (row["client"], row["stats"])
