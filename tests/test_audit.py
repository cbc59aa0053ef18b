"""Audit an unmodified Flower app: the curious hook as a drop-in wrapper, and the audit mod."""

import json

import pytest
import torch
from flwr.simulation import run_simulation

from fedsim.runtime import with_run_config
from tests.userapp.client_app import app as plain_client, audited_app
from tests.userapp.server_app import app as user_server

CLIENTS = 3
BACKEND = {"client_resources": {"num_cpus": 2, "num_gpus": 0.0},   # one actor: clients run in partition order
           "init_args": {"num_cpus": 2, "logging_level": "ERROR", "log_to_driver": False,
                         "include_dashboard": False, "object_store_memory": 128 * 2**20}}


def simulate(tmp_path, name, client_app, **run_config):
    run_config = {"model": "fc", "clients": CLIENTS, "rounds": 2, "final-path": str(tmp_path / f"{name}.pt"),
                  "curious-output": str(tmp_path / name), **run_config}
    run_simulation(with_run_config(user_server, run_config), client_app, num_supernodes=int(run_config["clients"]),
                   backend_config=BACKEND)
    return torch.load(tmp_path / f"{name}.pt")


def records(path):
    return [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]


def test_spear_recovers_every_clients_batch_exactly_through_the_audit_mod(tmp_path):
    simulate(tmp_path, "spear", audited_app, **{"curious-attack": "spear"})
    rows = [r for r in records(tmp_path / "spear") if r["kind"] == "attack"]
    assert len(rows) == CLIENTS * 2
    assert all(r["exact"] == 1.0 and r["certified"] for r in rows), rows
    assert json.loads((tmp_path / "spear" / "status.json").read_text())["state"] == "complete"


def test_with_one_client_the_wrapped_run_ends_in_the_same_model_bit_for_bit(tmp_path):
    """The wrapper and the audit mod change no bit of training. One client: with several, Flower's FedAvg sums the
    replies in their arrival order, which varies from run to run (plain runs differ by float32 rounding, ~1e-8)."""
    plain = simulate(tmp_path, "plain1", plain_client, clients=1)
    wrapped = simulate(tmp_path, "spear1", audited_app, clients=1, **{"curious-attack": "spear"})
    assert all(torch.equal(plain[k], wrapped[k]) for k in plain)
    rows = [r for r in records(tmp_path / "spear1") if r["kind"] == "attack"]
    assert len(rows) == 2 and all(r["exact"] == 1.0 for r in rows)


def test_without_the_audit_mod_only_what_needs_no_ground_truth_is_recorded(tmp_path):
    simulate(tmp_path, "blind", plain_client, rounds=1, **{"curious-attack": "spear"})
    rows = [r for r in records(tmp_path / "blind") if r["kind"] == "attack"]
    assert rows and all(r["exact"] is None and r["certified"] for r in rows)


def test_inverting_gradients_scores_a_reconstruction_on_the_cnn(tmp_path):
    simulate(tmp_path, "ig", audited_app, model="cnn", rounds=1,
             **{"curious-attack": "{name: inverting, iterations: 100}"})   # knobs as in the CLI's YAML
    rows = [r for r in records(tmp_path / "ig") if r["kind"] == "attack"]
    assert len(rows) == CLIENTS and all(r["psnr"] is not None and r["batch"] == 8 for r in rows)
