"""The curious hook's boundary: attacks never see ground truth, aggregation never sees the audit record."""

import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedsim.attacks.base import Attack
from fedsim.hook import AUDIT_KEY, CuriousStrategy, MemoryRecorder, ThreatModel, audit_record, build_attacks
from fedsim.models import build_model
from fedsim.runtime import InlineGrid
from fedsim.threat import Observation, Reconstruction


class Spy(Attack):
    """Records what it was given and answers with the analytic inversion of the first layer."""

    name = "spy"

    def __init__(self):
        super().__init__()
        self.seen: list[Observation] = []

    def reconstruct(self, obs):
        self.seen.append(obs)
        gw, gb = obs.gradient()["net.1.weight"], obs.gradient()["net.1.bias"]
        return Reconstruction(inputs=(gw.T @ gb / gb.dot(gb)).reshape(1, *obs.meta.input_shape))


class InnerSpy(FedAvg):
    def __init__(self):
        super().__init__(min_available_nodes=1, min_train_nodes=1, fraction_evaluate=0.0)
        self.replies = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.replies.extend(replies)
        return super().aggregate_train(server_round, replies)


def _model():
    return build_model({"name": "fc", "widths": [16]}, (6,), 3, seed=0)


def _reply_to(msg, x, y, grads, with_audit=True):
    content = RecordDict({"arrays": ArrayRecord({k: v for k, v in grads.items()}),
                          "metrics": MetricRecord({"num-examples": 1})})
    if with_audit:
        content[AUDIT_KEY] = audit_record(x, y)
    return Message(content, reply_to=msg)


def _client_app(secret_inputs):
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        model = _model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = secret_inputs[pid], torch.tensor([pid % 3])
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
        return _reply_to(msg, x, y, grads)

    return app


def test_attacks_never_see_ground_truth_and_aggregation_never_sees_the_audit_record():
    from flwr.supercore.task_identity import TaskIdentity

    secret = [torch.randn(1, 6) for _ in range(3)]
    grid = InlineGrid(_client_app(secret), 3)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run_id, 0
    spy, inner, recorder = Spy(), InnerSpy(), MemoryRecorder()
    hook = CuriousStrategy(inner, [spy], _model, ThreatModel(mode="fedsgd", input_shape=(6,)), recorder=recorder)
    hook.start(grid, ArrayRecord(_model().state_dict()), num_rounds=2)

    assert len(spy.seen) == 6
    for obs in spy.seen:
        assert obs.meta.labels is None                          # labels not granted
        assert set(obs.update) == {n for n, _ in _model().named_parameters()}
        assert not any(torch.equal(v.flatten(), s.flatten()) for v in obs.update.values() for s in secret)
        assert not hasattr(obs, "truth") and "truth" not in vars(obs.meta)
    assert inner.replies and all(AUDIT_KEY not in r.content for r in inner.replies)
    # ...yet the scorer had the truth: the analytic inversion is exact for one sample
    assert [r.scores.exact for r in recorder.attacks] == [1.0] * 6


def test_granted_labels_reach_the_attack_and_nothing_else():
    from flwr.supercore.task_identity import TaskIdentity

    secret = [torch.randn(1, 6) for _ in range(2)]
    grid = InlineGrid(_client_app(secret), 2)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run_id, 0
    spy = Spy()
    hook = CuriousStrategy(InnerSpy(), [spy], _model, ThreatModel(mode="fedsgd", input_shape=(6,), grant_labels=True))
    hook.start(grid, ArrayRecord(_model().state_dict()), num_rounds=1)
    assert sorted(int(o.meta.labels[0]) for o in spy.seen) == [0, 1]
    assert all(o.meta.labels.shape == (1,) for o in spy.seen)


def test_the_wrapper_does_not_change_aggregation():
    from flwr.supercore.task_identity import TaskIdentity

    secret = [torch.randn(1, 6) for _ in range(3)]
    finals = []
    for wrap in (False, True):
        random.seed(0)  # FedAvg samples nodes with the global random module
        grid = InlineGrid(_client_app(secret), 3, node_seed=1)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run_id, 0
        strategy = InnerSpy()
        if wrap:
            strategy = CuriousStrategy(strategy, [Spy()], _model, ThreatModel(mode="fedsgd", input_shape=(6,)))
        finals.append(strategy.start(grid, ArrayRecord(_model().state_dict()), num_rounds=2).arrays)
    a, b = (f.to_torch_state_dict() for f in finals)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_faulty_replies_are_recorded_and_left_out():
    from flwr.app import Error
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        if pid == 0:
            raise RuntimeError("boom")
        state = msg.content["arrays"].to_torch_state_dict()
        if pid == 1:
            state["net.1.weight"][0, 0] = float("nan")
        if pid == 2:
            state["net.1.bias"] = state["net.1.bias"][:-1]
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=msg)

    grid = InlineGrid(app, 4)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run_id, 0
    inner, recorder = InnerSpy(), MemoryRecorder()
    hook = CuriousStrategy(inner, [Spy()], _model, ThreatModel(mode="fedavg", input_shape=(6,)), recorder=recorder)
    result = hook.start(grid, ArrayRecord(_model().state_dict()), num_rounds=1)
    assert sorted(f.kind for f in recorder.faults) == ["crash", "nan", "shape"]
    assert len(recorder.attacks) == 1                      # only the healthy reply was attacked
    assert len(inner.replies) == 2                         # healthy + the error reply FedAvg filters itself
    assert all(np.isfinite(v.numpy()).all() for v in result.arrays.values())


class FailsOnClient1(Spy):
    """The analytic inversion, except that it raises on client 1's updates."""

    name = "fails_on_1"

    def reconstruct(self, obs):
        if obs.client == 1:
            raise RuntimeError("no solution")
        return super().reconstruct(obs)


def test_an_attack_that_raises_on_one_healthy_client_is_scored_as_recovering_nothing_there(tmp_path):
    """Not left out: the summaries count client 1's sample as lost (2 of 3 identified, not 2 of 2)."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedsim.console import RunConsole
    from fedsim.results import ResultsWriter, RunRecorder

    secret = [torch.randn(1, 6) for _ in range(3)]
    grid = InlineGrid(_client_app(secret), 3)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run_id, 0
    writer = ResultsWriter(tmp_path)
    writer.start("", 1)
    console = RunConsole(1, "t", enabled=False)
    recorder = RunRecorder(writer, run_info={}, rounds=1, grid_clients=0, console=console)
    partitions = {p: torch.cat([secret[p], torch.randn(9, 6)]) for p in range(3)}
    hook = CuriousStrategy(FedAvg(min_available_nodes=1, min_train_nodes=1, fraction_evaluate=0.0),
                           [FailsOnClient1()], _model, ThreatModel(mode="fedsgd", input_shape=(6,)),
                           recorder=recorder, partitions=partitions.get)
    hook.start(grid, ArrayRecord(_model().state_dict()), num_rounds=1,
               evaluate_fn=lambda r, a: recorder.on_evaluate(r, {"accuracy": 0.5}) or MetricRecord({}))
    rows = {r["client"]: r for r in writer_rows(tmp_path)}
    assert rows[1]["error"] == "RuntimeError: no solution"
    assert (rows[1]["identified"], rows[1]["exact"], rows[1]["batch"]) == (0.0, 0.0, 1)
    assert rows[0]["identified"] == rows[0]["exact"] == 1.0
    stats = console.rows[-1]["attacks"]["fails_on_1"]
    assert stats["identified"] == pytest.approx(2 / 3) and stats["exact"] == pytest.approx(2 / 3)
    assert stats["errors"] == 1


def writer_rows(directory):
    from fedsim.results import read_jsonl

    return [r for r in read_jsonl(directory / "results.jsonl") if r.get("kind") == "attack"]


# --- transparency to strategy subclasses ------------------------------------------------------------------------

class Scheduled(FedAvg):
    """A subclass with its own state and methods, and its own start() that keeps a log."""

    def __init__(self):
        super().__init__(min_available_nodes=1, min_train_nodes=1, fraction_evaluate=0.0)
        self.log: list[str] = []

    def note(self, text):
        self.log.append(text)
        return len(self.log)

    def start(self, grid, initial_arrays, num_rounds=3, timeout=3600, train_config=None, evaluate_config=None,
              evaluate_fn=None):
        self.note(f"own start, tag={self.tag}")
        return super().start(grid, initial_arrays, num_rounds=num_rounds, timeout=timeout, train_config=train_config,
                             evaluate_config=evaluate_config, evaluate_fn=evaluate_fn)


def test_unknown_attributes_are_the_wrapped_strategys_and_its_own_start_runs_with_every_round_attacked():
    inner, spy, recorder = Scheduled(), Spy(), MemoryRecorder()
    hook = CuriousStrategy(inner, [spy], _model, ThreatModel(mode="fedsgd", input_shape=(6,)), recorder=recorder)
    assert hook.note("wrapped") == 1 and hook.log is inner.log and hook.fraction_evaluate == 0.0
    hook.tag = "set through the wrapper"          # a new attribute lands where the strategy's methods read it
    assert inner.tag == "set through the wrapper" and "tag" not in vars(hook)
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        hook.missing
    grid = InlineGrid(_client_app([torch.randn(1, 6) for _ in range(2)]), 2)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run_id, 0
    hook.start(grid, ArrayRecord(_model().state_dict()), num_rounds=2)
    assert inner.log == ["wrapped", "own start, tag=set through the wrapper"]
    assert sorted((o.round, o.client) for o in spy.seen) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert not set(CuriousStrategy._HOOKED) & set(vars(inner))  # the strategy is left as it was


def test_the_threat_model_counts_steps_and_distinct_samples_in_the_apps_terms():
    epochs = ThreatModel(local_epochs=2, batch_size=8)
    assert epochs.training("fedavg", 8, 32) == (8, 32)      # 2 epochs x 4 batches of 8, the same 32 samples
    assert epochs.training("fedavg", 8, 30) == (8, 30)      # the last batch of an epoch holds 6
    assert epochs.training("fedsgd", 8, 32) == (1, 8)
    steps = ThreatModel(local_steps=3, batch_size=8)
    assert steps.training("fedavg", 8, 100) == (3, 24) and steps.training("fedavg", 8, 16) == (3, 16)
    assert ThreatModel().training("fedavg", None, 32) == (None, None)
    with pytest.raises(ValueError, match="local_epochs"):
        ThreatModel(local_epochs=2, local_steps=8)
    with pytest.raises(ValueError, match="optimizer='adagrad' is invalid"):
        ThreatModel(optimizer="adagrad")
    with pytest.raises(ValueError, match="momentum"):
        ThreatModel(momentum=1.5)


def test_attacks_are_given_by_name_by_knobs_as_in_the_cli_yaml_or_by_a_yaml_file(tmp_path):
    (tmp_path / "ig.yaml").write_text("name: inverting\niterations: 7\n")
    specs = ["spear", {"name": "inverting", "iterations": 200}, str(tmp_path / "ig.yaml")]
    named, knobs, from_file = build_attacks(specs)
    assert (named.name, knobs.config.iterations, from_file.config.iterations) == ("spear", 200, 7)
    with pytest.raises(ValueError, match=r"attacks\[0\]\.iteration"):
        build_attacks([{"name": "inverting", "iteration": 200}])
    with pytest.raises(ValueError, match=r"attacks\[0\]"):
        build_attacks([3])
