"""Flower apps shaped like Flower's own examples, audited end to end: the audit mod, the wrapper around a FedAvg
subclass with its own start(), the run directory and fedsim-report.

Runs use fedsim's in-process Grid with fixed node ids and a seeded `random` (FedAvg samples nodes with it), so a
plain run and an audited run see the same clients in the same order: with two clients the final models are
compared bit for bit (on Ray, replies arrive in a varying order and the sums differ in the last bit;
`tests/test_audit.py` compares one client there).
"""

import json
import random
import re

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from fedsim.attacks.base import Attack, register_attack
from fedsim import CuriousStrategy, ThreatModel, audit_mod
from fedsim.audit import capture
from fedsim.report import main as report_main
from fedsim.runtime import InlineGrid
from fedsim.threat import Reconstruction
from tests.flowerapps.advanced import client_app as advanced_client, server_app as advanced_server
from tests.flowerapps.quickstart import client_app as quickstart_client, server_app as quickstart_server

META: list = []   # (round, client, update names, TrainMeta) as the spy attack saw them


@register_attack("spy_meta")
class SpyMeta(Attack):
    name = "spy_meta"

    def reconstruct(self, obs):
        META.append((obs.round, obs.client, sorted(obs.update), obs.meta))
        return Reconstruction(inputs=None)


def run_inline(server_app, client_app, run_config, clients=2):
    random.seed(0)
    torch.manual_seed(0)
    grid = InlineGrid(client_app, clients, run_config, node_seed=0)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run_id, 0
    server_app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                             run_config=dict(run_config)))


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quickstart_shaped_app_with_torchvision_transforms_is_audited_and_trains_as_unaudited(tmp_path, one_thread):
    config = {"num-server-rounds": 2, "local-epochs": 1, "lr": 0.01}
    run_inline(quickstart_server.app, quickstart_client.app, {**config, "final-path": str(tmp_path / "plain.pt")})
    out = tmp_path / "audit"
    run_inline(quickstart_server.app, quickstart_client.audited_app,
               {**config, "final-path": str(tmp_path / "audited.pt"), "audit-output": str(out),
                "attacks": "[{name: inverting, iterations: 20}]"})
    assert same_state(torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "audited.pt"))

    rows = lines(out / "results.jsonl")
    assert [r for r in rows if r["kind"] == "fault"] == []
    attacks = [r for r in rows if r["kind"] == "attack"]
    assert sorted((r["round"], r["client"]) for r in attacks) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for r in attacks:  # every reply scored against the 16 images the client trained on (Normalize undone)
        assert r["batch"] == 16 and r["matched"] == 16 and r["psnr"] is not None and r["label_set_acc"] is not None
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["rounds_done"], status["rounds_total"], status["warnings"]) == \
        ("complete", 2, 2, [])
    rounds = lines(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all("eval_acc" in r and "train_loss" in r for r in rounds)  # the app's own metrics
    config_yaml = yaml.safe_load((out / "config.yaml").read_text())
    assert config_yaml["threat"]["local_epochs"] == 1 and config_yaml["threat"]["momentum"] == 0.9
    assert config_yaml["attacks"][0]["name"] == "inverting" and config_yaml["attacks"][0]["iterations"] == 20
    grids = sorted(p.name for p in (out / "grids").glob("*.png"))
    assert grids == [f"round00{r}_client{c}_inverting.png" for r in (1, 2) for c in (0, 1)]

    assert report_main([str(out)]) == 0
    assert (out / "report" / "index.html").exists() and len(list((out / "report" / "grids").rglob("*.png"))) == 4


def test_a_fedavg_subclass_with_its_own_start_behaves_as_unwrapped_while_every_round_is_attacked(tmp_path, one_thread):
    config = {"num-server-rounds": 2, "local-epochs": 2, "lr": 0.05}
    run_inline(advanced_server.app, advanced_client.app,
               {**config, "final-path": str(tmp_path / "plain.pt"), "save-path": str(tmp_path / "plain")})
    META.clear()
    out = tmp_path / "audit"
    run_inline(advanced_server.app, advanced_client.audited_app,
               {**config, "final-path": str(tmp_path / "audited.pt"), "save-path": str(tmp_path / "audited"),
                "audit-output": str(out), "attacks": "[{name: spear, max_seconds: 0.5}, spy_meta]"})
    assert same_state(torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "audited.pt"))
    # the subclass's own start() ran: its results file and checkpoints, identical to the unwrapped run's
    plain_files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert plain_files == sorted(p.name for p in (tmp_path / "audited").iterdir())
    assert "results.json" in plain_files and any(name.startswith("best_round") for name in plain_files)
    assert (tmp_path / "plain" / "results.json").read_text() == (tmp_path / "audited" / "results.json").read_text()
    for name in plain_files:
        if name.endswith(".pt"):
            assert same_state(torch.load(tmp_path / "plain" / name), torch.load(tmp_path / "audited" / name))

    attacks = [r for r in lines(out / "results.jsonl") if r["kind"] == "attack"]
    assert sorted((r["round"], r["client"], r["attack"]) for r in attacks) == \
        [(rnd, c, a) for rnd in (1, 2) for c in (0, 1) for a in ("spear", "spy_meta")]
    assert all(r["batch"] == 32 for r in attacks)  # ground truth: the 32 distinct samples of 2 epochs
    # 2 epochs of 4 batches of 8, described as such: 8 momentum-SGD steps on 32 distinct samples, head left out
    assert len(META) == 4
    for server_round, _, names, meta in META:
        assert (meta.local_epochs, meta.local_steps, meta.batch_size, meta.distinct_samples) == (2, 8, 8, 32)
        assert meta.lr == {1: 0.05, 2: 0.025}[server_round]  # as the strategy's schedule sent it (lr_key)
        assert (meta.optimizer.name, meta.optimizer.momentum) == ("sgd", 0.9)
        assert names == ["body.1.bias", "body.1.weight", "body.3.bias", "body.3.weight"]
    rounds = lines(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2] and all(r["accuracy"] is not None for r in rounds)
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    assert report_main([str(out)]) == 0


# --- capture failures, explicit capture, normalisation ------------------------------------------------------------

class Pooled(nn.Module):
    """Accepts images of any size: lets a client feed inputs of two shapes to one model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1))


def tiny_apps(train_step, rounds=1):
    client = ClientApp(mods=[audit_mod])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        model = Pooled()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        g = torch.Generator().manual_seed(pid)
        x, y = (torch.rand(8, 1, 8, 8, generator=g) - 0.5) / 0.5, torch.randint(0, 10, (8,), generator=g)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, optimizer, x, y)
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": 8})}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = CuriousStrategy(FedAvg(fraction_evaluate=0.0), ["spy_meta"], Pooled, ThreatModel(
            batch_size=8, local_steps=1, lr=0.1, input_shape=(1, 8, 8)), output=context.run_config["out"])
        strategy.start(grid, ArrayRecord(Pooled().state_dict()), num_rounds=rounds)

    return server, client


def test_when_capture_fails_the_client_still_trains_and_the_fault_names_it_with_the_full_reason(tmp_path):
    def two_shapes(model, optimizer, x, y):  # the model sees 8x8 and 6x6 images: no one batch to send
        for inputs in (x, x[:, :, :6, :6]):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), y).backward()
            optimizer.step()

    server, client = tiny_apps(two_shapes)
    run_inline(server, client, {"out": str(tmp_path / "out")})
    rows = lines(tmp_path / "out" / "results.jsonl")
    faults = [r for r in rows if r["kind"] == "fault"]
    assert sorted(f["client"] for f in faults) == [0, 1] and all(f["fault"] == "audit" for f in faults)
    assert all("changed shape" in f["detail"] and "(1, 6, 6)" in f["detail"] and "(1, 8, 8)" in f["detail"]
               for f in faults)
    attacks = [r for r in rows if r["kind"] == "attack"]
    assert len(attacks) == 2 and all(r["batch"] is None for r in attacks)  # attacked, unscored
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert (status["state"], status["rounds_trained"]) == ("complete", 1)


def test_a_run_whose_every_aggregation_is_skipped_ends_failed_not_complete(tmp_path):
    def crash(model, optimizer, x, y):
        raise RuntimeError("the client's own bug")

    server, client = tiny_apps(crash, rounds=2)
    run_inline(server, client, {"out": str(tmp_path / "out")})
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "failed" and "no round produced a model" in status["error"]
    assert status["rounds_done"] == 2 and status["rounds_trained"] == 0
    crashes = [r for r in lines(tmp_path / "out" / "results.jsonl") if r["kind"] == "fault"]
    assert len(crashes) == 4 and all("the client's own bug" in r["detail"] for r in crashes)


def test_explicit_capture_sends_what_the_client_names_and_a_wrong_normalisation_is_flagged(tmp_path):
    def functional(model, optimizer, x, y):  # no module call: the automatic capture has nothing to see
        capture(x, y)
        optimizer.zero_grad()
        weight, bias = model.conv.weight, model.conv.bias
        features = nn.functional.adaptive_avg_pool2d(torch.relu(nn.functional.conv2d(x, weight, bias, padding=1)), 4)
        nn.functional.cross_entropy(nn.functional.linear(features.flatten(1), model.fc.weight, model.fc.bias),
                                    y).backward()
        optimizer.step()

    server, client = tiny_apps(functional)
    run_inline(server, client, {"out": str(tmp_path / "out")})
    rows = lines(tmp_path / "out" / "results.jsonl")
    assert [r for r in rows if r["kind"] == "fault"] == []
    assert all(r["batch"] == 8 for r in rows if r["kind"] == "attack")
    # the clients normalised with mean 0.5, std 0.5; the threat model says none: pixels span [-1, 1]
    warnings = json.loads((tmp_path / "out" / "status.json").read_text())["warnings"]
    assert len(warnings) == 1 and "normalization" in warnings[0]
    suggested = re.search(r"suggest mean \(([\d.]+)\) and std \(([\d.]+)\)", warnings[0])
    assert suggested and [float(v) for v in suggested.groups()] == pytest.approx([0.5, 0.5], abs=0.02)
