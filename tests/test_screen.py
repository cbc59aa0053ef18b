"""Every reply is screened completely before anything uses it: a hostile reply is a fault of its kind, never the
end of the run, never an input to aggregation, attacks or scoring; a non-finite global model is never installed."""

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsim.hook import AUDIT_KEY, CLIENT_KEY, CuriousStrategy, MemoryRecorder, ThreatModel, audit_record
from fedsim.screen import check_audit, screen
from tests.test_hook import InnerSpy, Spy, _model


def _reference():
    return _model().state_dict()


def _content(arrays=None, metrics=None, **configs):
    state = {k: v.clone() for k, v in _reference().items()} if arrays is None else arrays
    record = state if isinstance(state, ArrayRecord) else ArrayRecord(state)
    content = RecordDict({"arrays": record, "metrics": MetricRecord(metrics or {"num-examples": 1})})
    for key, value in configs.items():
        content[key] = value
    return content


def _with(name, value):
    state = {k: v.clone() for k, v in _reference().items()}
    state[name] = value
    return state


def _raw(name, **fields):
    record = ArrayRecord({k: Array(v.numpy()) for k, v in _reference().items()})
    record[name] = Array(**fields)
    return record


def _objects():
    buf = io.BytesIO()
    np.save(buf, np.array([object(), 1], dtype=object), allow_pickle=True)
    return buf.getvalue()


W = "net.1.weight"


CASES = {  # what a hostile or broken client sends -> the fault kind it must be recorded as
    "object array": (_content(_raw(W, dtype="object", shape=(2,), stype="numpy.ndarray", data=_objects())), "decode"),
    "unknown serialisation": (_content(_raw(W, dtype="float32", shape=(2,), stype="pickle", data=b"\x80" * 8)),
                              "decode"),
    "integers": (_content(_with(W, torch.ones(16, 6, dtype=torch.int32))), "dtype"),
    "booleans": (_content(_with(W, torch.ones(16, 6, dtype=torch.bool))), "dtype"),
    "complex with NaN": (_content(_with(W, torch.full((16, 6), complex(float("nan"), 0)))), "dtype"),
    "float64": (_content(_with(W, torch.zeros(16, 6, dtype=torch.float64))), "dtype"),
    "wrong shape": (_content(_with(W, torch.zeros(16, 5))), "shape"),
    "two ArrayRecords": (_content(extra=ArrayRecord({"x": torch.zeros(1)})), "shape"),
    "NaN": (_content(_with(W, torch.full((16, 6), float("nan")))), "nan"),
    "1e38": (_content(_with(W, torch.full((16, 6), 1e38))), "huge"),
    "1e12 x the others": (_content(_with(W, torch.full((16, 6), 1e12))), "huge"),
    "num-examples NaN": (_content(metrics={"num-examples": float("nan")}), "examples"),
    "num-examples 0": (_content(metrics={"num-examples": 0}), "examples"),
    "num-examples -3": (_content(metrics={"num-examples": -3}), "examples"),
    "num-examples 2.5": (_content(metrics={"num-examples": 2.5}), "examples"),
    "num-examples 1e15": (_content(metrics={"num-examples": 1e15}), "examples"),
    "num-examples missing": (_content(metrics={"loss": 1.0}), "examples"),
    "a metric that is inf": (_content(metrics={"num-examples": 1, "train_loss": float("inf")}), "metrics"),
    "other metric keys": (_content(metrics={"num-examples": 1, "extra": 1.0}), "metrics"),
    "audit bytes short": (_content(**{AUDIT_KEY: ConfigRecord({"x": b"\0" * 3, "x_shape": [1, 6], "y": [0]})}),
                          "audit"),
    "audit labels missing": (_content(**{AUDIT_KEY: ConfigRecord({"x": b"\0" * 24, "x_shape": [1, 6]})}), "audit"),
    "audit shape negative": (_content(**{AUDIT_KEY: ConfigRecord({"x": b"", "x_shape": [-1, 6], "y": [0]})}),
                             "audit"),
    "buffers not in the reply": (_content(**{CLIENT_KEY: ConfigRecord({"buffers": ["net.1.bias", "nope"]})}),
                                 "client"),
}


def test_each_hostile_reply_is_rejected_with_its_kind_and_the_healthy_ones_pass():
    healthy = [_content(**{AUDIT_KEY: audit_record(torch.rand(1, 6), torch.tensor([1]))}) for _ in range(4)]
    names = list(CASES)
    problems = screen([c for c, _ in CASES.values()] + healthy, _reference(), arrayrecord_key="arrays",
                      audit_key=AUDIT_KEY, client_key=CLIENT_KEY)
    found = {name: (p.kind if p else None) for name, p in zip(names, problems)}
    assert found == {name: kind for name, (_, kind) in CASES.items()}
    assert problems[len(names):] == [None] * 4


def test_without_a_reference_complex_nan_is_not_finite_and_integers_are_not_floats():
    nan = _content(_with(W, torch.full((16, 6), complex(float("nan"), 0))))
    ints = _content(_with(W, torch.ones(16, 6, dtype=torch.int64)))
    kinds = [p.kind for p in screen([nan, ints], None, arrayrecord_key="arrays")]
    assert kinds == ["nan", "dtype"]


def test_a_well_formed_audit_record_passes():
    assert check_audit(audit_record(torch.rand(3, 2, 2), torch.tensor([0, 1, 2]))) is None


def _hostile_app():
    """Client 0..5 misbehave as the issue reported them, 6 and 7 are honest."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        model = _model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = torch.randn(1, 6, generator=torch.Generator().manual_seed(pid)), torch.tensor([pid % 3])
        loss = torch.nn.functional.cross_entropy(model(x), y)
        names = [n for n, _ in model.named_parameters()]
        grads = dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))
        record = ArrayRecord(grads)
        metrics = {"num-examples": 1}
        audit = audit_record(x, y)
        info = {"partition-id": pid}
        if pid == 0:
            record[W] = Array(dtype="object", shape=(2,), stype="numpy.ndarray", data=_objects())
        elif pid == 1:
            metrics = {"num-examples": float("nan")}
        elif pid == 2:
            audit = ConfigRecord({"x": b"\0", "x_shape": [2, 6], "y": "zero"})
        elif pid == 3:
            record = ArrayRecord({k: torch.full_like(v, 1e38) for k, v in grads.items()})
        elif pid == 4:
            info = {"partition-id": 6}          # claims an honest client's partition
        elif pid == 5:
            metrics = {"num-examples": 1e15}
        return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics), AUDIT_KEY: audit,
                                   CLIENT_KEY: ConfigRecord(info)}), reply_to=msg)

    return app


def _start(app, nodes, inner, recorder, rounds=2, **kwargs):
    from flwr.supercore.task_identity import TaskIdentity

    from fedsim.runtime import InlineGrid

    grid = InlineGrid(app, nodes, node_seed=0)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run_id, 0
    client_of_node = {n: c.node_config["partition-id"] for n, c in grid.contexts.items()}
    hook = CuriousStrategy(inner, [Spy()], _model, ThreatModel(mode="fedsgd", input_shape=(6,)), recorder=recorder,
                           client_of_node=client_of_node, **kwargs)
    return hook, hook.start(grid, ArrayRecord(_model().state_dict()), num_rounds=rounds)


def test_hostile_clients_cannot_stop_the_round_and_only_honest_replies_are_attacked_and_aggregated():
    inner, recorder = InnerSpy(), MemoryRecorder()
    hook, result = _start(_hostile_app(), 8, inner, recorder)
    kinds = sorted((f.round, f.client, f.kind) for f in recorder.faults)
    assert kinds == sorted((r, c, k) for r in (1, 2) for c, k in
                           ((0, "decode"), (1, "examples"), (2, "audit"), (3, "huge"), (4, "impersonate"),
                            (5, "examples")))
    assert sorted((a.round, a.client) for a in recorder.attacks) == [(r, c) for r in (1, 2) for c in (6, 7)]
    assert all(a.scores is not None and a.scores.exact == 1.0 for a in recorder.attacks)
    assert len(inner.replies) == 4 and hook.rounds_trained == [1, 2]
    assert all(np.isfinite(v.numpy()).all() for v in result.arrays.values())


class NaNAggregate(InnerSpy):
    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if server_round == 2:
            arrays = ArrayRecord({k: torch.full_like(v, float("nan")) for k, v in arrays.to_torch_state_dict().items()})
        return arrays, metrics


def test_a_non_finite_global_model_is_rejected_recorded_and_the_previous_one_kept():
    from tests.test_hook import _client_app

    recorder = MemoryRecorder()
    hook, result = _start(_client_app([torch.randn(1, 6) for _ in range(2)]), 2, NaNAggregate(), recorder, rounds=3)
    assert [(f.round, f.client, f.kind) for f in recorder.faults] == [(2, None, "aggregate")]
    assert hook.rounds_trained == [1, 3] and hook.rounds_rejected == [2]
    assert all(np.isfinite(v.numpy()).all() for v in result.arrays.values())


def test_a_scorer_that_raises_is_a_score_fault_not_the_end_of_the_run():
    from tests.test_hook import _client_app

    def scorer(recon, truth, meta):
        raise ValueError("cost matrix is infeasible")

    recorder = MemoryRecorder()
    hook, _ = _start(_client_app([torch.randn(1, 6) for _ in range(2)]), 2, InnerSpy(), recorder, rounds=1,
                     scorer=scorer)
    assert sorted(f.kind for f in recorder.faults) == ["score", "score"]
    assert all("cost matrix is infeasible" in a.error for a in recorder.attacks)
    assert hook.rounds_trained == [1]


TINY = ("data=synthetic", "data.dim=8", "data.train_size=100", "data.test_size=50", "model.widths=[8]",
        "attack=analytic", "fl.batch_size=1")


@pytest.mark.parametrize("overrides, reason", [
    (("defense=noise", "defense.sigma=1e37", "fl.clients=2", "fl.rounds=1"), "no round trained"),
    (("faults.crash=1.0", "fl.clients=2", "fl.rounds=2"), "no round trained"),
])
def test_a_run_in_which_no_round_trained_is_not_complete(tmp_path, overrides, reason):
    from fedsim.api import load
    from fedsim.server_app import RunUnusable

    with pytest.raises(RunUnusable, match=reason):
        from tests.conftest import fedsim_run

        fedsim_run(tmp_path, *TINY, *overrides)
    status = load(tmp_path / "run").status
    assert status["state"] == "failed" and reason in status["error"]


def test_honest_replies_large_next_to_many_tiny_ones_are_not_huge():
    """Late in FedSGD most gradients of well-fit samples are tiny: the model's own norm keeps the bar honest."""
    reference = _reference()
    scale = sum(float(v.double().pow(2).sum()) for v in reference.values()) ** 0.5
    tiny = [_content({k: torch.full_like(v, 1e-9) for k, v in reference.items()}) for _ in range(5)]
    usual = [_content({k: torch.randn_like(v) for k, v in reference.items()}) for _ in range(4)]
    problems = screen(tiny + usual, reference, arrayrecord_key="arrays", scale=scale)
    assert problems == [None] * 9
    without_scale = screen(tiny + usual, reference, arrayrecord_key="arrays")
    assert [p.kind for p in without_scale if p] == ["huge"] * 4    # what the scale is for


def test_the_one_pass_check_still_finds_values_near_the_float_limit():
    # the fast path (one BLAS sum of squares) must hand anything unusual to the value-by-value check
    import math

    import numpy as np

    from fedsim.screen import check_arrays, norm

    limit = math.sqrt(float(np.finfo(np.float32).max))              # ~1.84e19
    over = np.zeros(1000, dtype=np.float32)
    over[7] = 2e19
    assert check_arrays({"w": over}, None).kind == "huge"
    under = np.full(1000, 1e19, dtype=np.float32)                   # each value fine, the float32 sum overflows
    assert check_arrays({"w": under}, None) is None
    assert norm({"w": under}) == pytest.approx(math.sqrt(1000) * 1e19, rel=1e-6)
    one_nan = np.ones((30, 30), dtype=np.float32)
    one_nan[3, 4] = np.nan
    assert check_arrays({"w": one_nan}, None).detail == "'w' holds 1 non-finite values"
    fortran = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    sums: dict = {}
    assert check_arrays({"w": fortran}, None, sums=sums) is None and sums["w"] == float((fortran ** 2).sum())
    assert limit > 1e19
