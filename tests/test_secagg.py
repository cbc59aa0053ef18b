"""defense=secagg: Flower's SecAgg+ gives the server the weighted mean of the updates, and nothing else."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.defenses.secagg import SecAggConfig, SecAggGrid, quantisation_bound, secagg_mod
from fedsim.hook import AGGREGATE_CLIENT, CLIENT_KEY
from fedsim.runtime import InlineGrid
from tests.spies import SEEN


def _toy_app(updates, weights, crash=()):
    """A ClientApp behind secagg_mod whose client i sends updates[i] with weight weights[i]."""
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        if pid in crash:
            raise RuntimeError("client crashed")
        assert set(msg.content["arrays"].keys()) == set(updates[pid])  # a plain fedsim train message inside
        return Message(RecordDict({"arrays": ArrayRecord({k: v.clone() for k, v in updates[pid].items()}),
                                   "metrics": MetricRecord({"num-examples": weights[pid], "train_loss": 0.5}),
                                   CLIENT_KEY: ConfigRecord({"partition-id": pid})}), reply_to=msg)

    return app


def _secure_round(updates, weights, cfg=SecAggConfig(), crash=()):
    from flwr.supercore.task_identity import TaskIdentity

    grid = InlineGrid(_toy_app(updates, weights, crash), len(updates))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run_id, 0
    secure = SecAggGrid(grid, cfg, max_weight=max(weights))
    start = {k: torch.zeros_like(v) for k, v in updates[0].items()}
    messages = [Message(RecordDict({"arrays": ArrayRecord(start), "config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=node, message_type=MessageType.TRAIN, group_id="1")
                for node in grid.get_node_ids()]
    return secure, list(secure.send_and_receive(messages))


def _updates(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": 0.3 * torch.randn(20, 7, generator=g), "b": 0.3 * torch.randn(20, generator=g)} for _ in range(k)]


@pytest.mark.parametrize("weights", [[8, 8, 8, 8], [3, 10, 7, 1]])
def test_the_secure_aggregate_is_the_weighted_mean_within_the_quantisation_error(weights):
    np.random.seed(0)  # Flower's stochastic rounding draws from numpy's global generator
    updates = _updates(4)
    secure, replies = _secure_round(updates, weights)
    assert len(replies) == 4 and not any(r.has_error() for r in replies)
    aggregates = [r.content["arrays"].to_torch_state_dict() for r in replies]
    assert all(torch.equal(a[k], aggregates[0][k]) for a in aggregates for k in a)   # one aggregate, for everyone
    total = sum(weights)
    bound = quantisation_bound(SecAggConfig(), weights, max(weights))
    assert bound < 1e-4
    for name in updates[0]:
        expected = sum(w * u[name].double() for w, u in zip(weights, updates)) / total
        error = (aggregates[0][name].double() - expected).abs().max().item()
        assert 0 < error <= bound, (name, error, bound)      # quantised, and within the bound
        weighted_sum = sum(w * u[name].double() for w, u in zip(weights, updates))
        assert (aggregates[0][name].double() * total - weighted_sum).abs().max().item() <= bound * total
    # what the server held during the protocol: masked vectors in config records, never a plain array
    log = secure.last_round
    assert len(log.stages) == 4 and log.individual_arrays() == 0
    assert all(entry["error"] is False for stage in log.stages for entry in stage)


def test_a_client_that_fails_mid_round_is_left_out_and_the_others_are_still_summed():
    np.random.seed(0)
    updates, weights = _updates(5, seed=1), [4, 4, 4, 4, 4]
    _, replies = _secure_round(updates, weights, SecAggConfig(num_shares=1.0, reconstruction_threshold=0.6),
                               crash=(4,))
    ok = [r for r in replies if not r.has_error()]
    assert len(ok) == 4 and sum(r.has_error() for r in replies) == 1
    aggregate = ok[0].content["arrays"].to_torch_state_dict()
    expected = sum(u["w"] for u in updates[:4]) / 4
    assert (aggregate["w"] - expected).abs().max().item() < 1e-4


def test_secagg_config_is_checked_at_the_door():
    from fedsim.defenses.base import build_defense
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="modulus_range"):
        build_defense({"name": "secagg", "modulus_range": 3000})
    with pytest.raises(ConfigError, match="num_shares"):
        build_defense({"name": "secagg", "num_shares": 2})
    from fedsim.api import compose
    from fedsim.config import validate

    with pytest.raises(ConfigError, match="fl.clients"):
        validate(compose(["defense=secagg", "fl.clients=1", "data=digits"]))


def test_in_the_federation_the_hook_only_ever_sees_the_aggregate(tmp_path):
    from tests.conftest import fedsim_run

    args = ("data=digits", "model.widths=[32]", "fl.rounds=2", "fl.batch_size=4", "fl.clients=3",
            "attack=analytic", "attack.name=spy_updates")
    SEEN.clear()
    plain = fedsim_run(tmp_path, *args, name="plain")
    individual = [u for (rnd, _, u, _) in SEEN if rnd == 1]
    assert len(individual) == 3 and all(b == 4 for *_, b in SEEN)
    SEEN.clear()
    np.random.seed(0)
    secure = fedsim_run(tmp_path, *args, "defense=secagg", name="secure")
    assert [(rnd, client) for rnd, client, _, _ in SEEN] == [(1, AGGREGATE_CLIENT), (2, AGGREGATE_CLIENT)]
    assert all(b == 12 for *_, b in SEEN)                     # SPEAR's effective batch: 3 clients x 4 samples
    observed = SEEN[0][2]
    mean = {k: sum(u[k] for u in individual) / 3 for k in observed}
    assert all(torch.allclose(observed[k], mean[k], atol=1e-4) for k in observed)   # the mean gradient ...
    for u in individual:                                                           # ... never one client's
        assert max((observed[k] - u[k]).abs().max().item() for k in observed) > 1e-2
    assert [r["observed"] for r in secure.rounds if r["round"] >= 1] == ["aggregate", "aggregate"]
    assert [r["observed"] for r in plain.rounds if r["round"] >= 1] == ["individual", "individual"]
    rows = secure.attacks()
    assert [r["client"] for r in rows] == [AGGREGATE_CLIENT] * 2 and all(r["batch"] == 12 for r in rows)
    # training goes on: the secure aggregate moves the model like the plain mean does
    assert secure.rounds[-1]["accuracy"] == pytest.approx(plain.rounds[-1]["accuracy"], abs=0.02)


@pytest.mark.slow
def test_secagg_runs_on_rays_simulation_engine(tmp_path):
    from tests.conftest import fedsim_run

    r = fedsim_run(tmp_path, "runtime=ray", "data=digits", "model.widths=[32]", "fl.rounds=2", "fl.batch_size=4",
                   "fl.clients=3", "attack=analytic", "defense=secagg")
    assert r.status["state"] == "complete"
    assert [row["observed"] for row in r.rounds if row["round"] >= 1] == ["aggregate", "aggregate"]
    assert [a["client"] for a in r.attacks()] == [AGGREGATE_CLIENT] * 2 and all(a["batch"] == 12 for a in r.attacks())


def test_the_same_seed_gives_the_same_secure_aggregate(tmp_path):
    """Flower's quantiser rounds stochastically with numpy's global generator: fedsim seeds it per client and round."""
    from tests.conftest import fedsim_run

    args = ("data=digits", "model.widths=[32]", "fl.rounds=1", "fl.batch_size=4", "fl.clients=2",
            "attack=analytic", "attack.name=spy_updates", "defense=secagg")
    runs = []
    for name in ("first", "second"):
        SEEN.clear()
        np.random.seed(len(name))            # whatever the process's generator held before
        fedsim_run(tmp_path, *args, name=name)
        runs.append(SEEN[0][2])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
