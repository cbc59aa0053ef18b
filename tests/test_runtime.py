"""The same config and seed give the same client updates and metrics in-process and on Ray; the audit channel
needs the node's consent as well as the server's request. What the runtimes' overhead rests on: a client runs only
the mods its configuration calls for, the ClientApp travels to Ray's actors by reference, inline clients share one
thread until one is late."""

import logging
import pickle
import threading
import time

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import OmegaConf

from fedsim.client_app import AUDIT_FLAG, CONFIG_KEY
from fedsim.protocol import SIMULATED_KEY
from fedsim.client_app import app as client_app
from fedsim.client_app import buffers_mod, client_plan, defense_mod, fault_mod
from fedsim.runtime import InlineGrid
from fedsim.hook import AUDIT_KEY
from tests.conftest import fedsim_run

strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_ray_and_inline_runtimes_give_identical_updates_and_sample_the_same_clients(tmp_path, capfd):
    args = ("attack=analytic", "fl.batch_size=2", "fl.rounds=3", "fl.clients=5", "fl.clients_per_round=2",
            "data=digits", "model.widths=[32]")
    inline = fedsim_run(tmp_path, *args, name="inline")
    capfd.readouterr()
    flower_lines = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = flower_lines.append
    logging.getLogger("flwr").addHandler(handler)
    try:
        ray = fedsim_run(tmp_path, *args, "runtime=ray", "runtime.cpus=2", name="ray")
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    noise = capfd.readouterr()
    assert noise.out.strip() == "" and noise.err.strip() == "", noise  # Ray and Flower stay quiet by default
    assert [r.getMessage() for r in flower_lines] == []
    assert ray.status["state"] == "complete"
    picked = {}
    for row in inline.attacks():
        picked.setdefault(row["round"], []).append(row["client"])
    assert all(len(clients) == 2 for clients in picked.values()) and len(picked) == 3
    assert len({tuple(c) for c in picked.values()}) > 1            # a different pair per round, from the seed
    assert all(row["psnr"] is not None for row in ray.attacks())    # virtual nodes consent to the audit channel
    assert strip(inline.results) == strip(ray.results)              # same clients, same reconstructions, same scores
    assert strip(inline.rounds) == strip(ray.rounds)                # same aggregated models


def _compose(*overrides):
    from fedsim.api import compose

    return OmegaConf.to_container(compose(list(overrides)), resolve=True)


@pytest.mark.parametrize("overrides, audit", [
    ((), True), (("runtime=ray",), True), (("runtime=deployment",), False),
    (("runtime=deployment", "audit=true"), True), (("runtime=ray", "audit=false"), False),
])
def test_the_audit_channel_is_on_in_simulation_and_off_in_deployment_unless_asked(overrides, audit):
    from fedsim.config import validate

    assert validate(_compose(*overrides), deep=False).audit is audit


def _train_reply(node_config: dict, *, simulated: bool):
    """The fedsim ClientApp's reply to a train instruction whose server asks for the audit record, called by an
    InlineGrid (a simulation) or directly, as a SuperNode's flwr-clientapp process calls it."""
    from flwr.app import Context
    from flwr.supercore.task_identity import TaskIdentity

    from fedsim.data import load_dataset
    from fedsim.models import build_model
    from fedsim.runtime import InlineGrid

    raw = _compose("data=digits", "model.widths=[8]", "fl.clients=2", "fl.batch_size=1")
    bundle = load_dataset(raw["data"])
    model = build_model(raw["model"], bundle.input_shape, bundle.num_classes, 0)
    config = ConfigRecord({CONFIG_KEY: yaml.safe_dump(raw), AUDIT_FLAG: True, "server-round": 1})
    grid = InlineGrid(client_app, 2, node_seed=0)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = grid.run_id, 1, 0
    node = next(iter(grid.get_node_ids()))
    grid.contexts[node].node_config.update(node_config)
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}),
                  dst_node_id=node, message_type=MessageType.TRAIN)
    if simulated:
        (reply,) = grid.send_and_receive([msg])
    else:  # a SuperNode: its node config does not say it is simulated
        grid.contexts[node].node_config.pop(SIMULATED_KEY)
        msg.metadata.__dict__["_message_id"] = "instruction"
        reply = client_app(msg, grid.contexts[node])
    assert not reply.has_error(), reply.error.reason
    return reply


def test_a_node_sends_ground_truth_only_when_simulated_or_its_operator_consents():
    assert AUDIT_KEY in _train_reply({}, simulated=True).content
    assert AUDIT_KEY not in _train_reply({}, simulated=False).content               # a SuperNode, server's say-so
    assert AUDIT_KEY not in _train_reply({"fedsim-audit": False}, simulated=False).content
    assert AUDIT_KEY in _train_reply({"fedsim-audit": True}, simulated=False).content  # --node-config fedsim-audit=true


def test_client_updates_do_not_depend_on_the_audit_channel():
    with_truth, without = _train_reply({}, simulated=True), _train_reply({}, simulated=False)
    a = with_truth.content["arrays"].to_torch_state_dict()
    b = without.content["arrays"].to_torch_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_node_holding_a_partition_of_another_split_is_refused():
    from flwr.supercore.task_identity import TaskIdentity

    from fedsim.errors import FedsimError
    from fedsim.runtime import InlineGrid
    from fedsim.server_app import discover_partitions

    grid = InlineGrid(client_app, 3, node_seed=0)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = grid.run_id, 1, 0
    nodes = sorted(grid.get_node_ids())
    assert sorted(discover_partitions(grid, nodes, 3, timeout=10).values()) == [0, 1, 2]
    grid.contexts[nodes[0]].node_config["num-partitions"] = 4     # an operator's --node-config "... num-partitions=4"
    with pytest.raises(FedsimError, match="of 4, but the run splits the data into fl.clients=3"):
        discover_partitions(grid, nodes, 3, timeout=10)


def _plan(*overrides, defense=None):
    raw = _compose(*overrides)
    if defense is not None:
        raw["defense"] = defense
    return client_plan(yaml.safe_dump(raw))


def test_a_client_runs_only_the_mods_its_configuration_calls_for():
    assert _plan().chain == ()                                   # a plain run: no mod between Flower and training
    assert _plan("faults.nan=0.1").chain == (fault_mod,)
    assert _plan("faults.dropout=0.1").chain == (fault_mod,)
    assert _plan("defense=noise").chain == (defense_mod,)
    assert _plan("defense=pruning").chain == (defense_mod,)
    assert _plan("fl.send_buffers=false").chain == (buffers_mod,)
    assert _plan("faults.crash=0.2", "defense=clip", "fl.send_buffers=false").chain == (fault_mod, defense_mod,
                                                                                        buffers_mod)
    # outermost first: the defenses' protocol mods (SecAgg+), faults, the transform, the buffers, their model mods
    chain = _plan("faults.nan=0.1", "fl.send_buffers=false", defense={"name": "stack", "steps": [
        {"name": "keylock"}, {"name": "noise"}, {"name": "secagg"}]}).chain
    assert [getattr(m, "__name__", "") for m in chain] == ["<lambda>", "fault_mod", "defense_mod", "buffers_mod",
                                                          "keylock_mod"]


def test_the_client_app_travels_by_reference():
    from ray import cloudpickle  # heavy: Ray

    assert pickle.loads(pickle.dumps(client_app)) is client_app
    assert cloudpickle.loads(cloudpickle.dumps(client_app)) is client_app
    assert len(cloudpickle.dumps(client_app)) < 200   # by value (mods, handlers, closures): 4.7 kB


def _recording_app(delays: dict[int, float], threads: list):
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        threads.append(threading.get_ident())
        time.sleep(delays.get(int(context.node_config["partition-id"]), 0.0))
        return Message(RecordDict({"c": ConfigRecord({"pid": int(context.node_config["partition-id"])})}),
                       reply_to=msg)

    return app


def test_inline_clients_share_one_thread_until_one_is_late():
    threads: list[int] = []
    grid = InlineGrid(_recording_app({2: 1.0}, threads), 5, node_seed=0)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = grid.run_id, 1, 0
    pid = {node: int(ctx.node_config["partition-id"]) for node, ctx in grid.contexts.items()}
    order = sorted(grid.get_node_ids(), key=pid.get)
    before = threading.active_count()
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                                     for n in order], timeout=0.5)
    assert [r.content["c"]["pid"] for r in replies] == [0, 1, 3, 4]   # the late client's reply never arrives
    assert threads[0] == threads[1] == threads[2] != threads[3] == threads[4]
    assert threading.active_count() <= before + 2   # the late client's thread, and the one now waiting
    grid.close()
    deadline = time.monotonic() + 10.0   # the late client finishes; then both threads end
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before
    assert len(grid.send_and_receive([Message(RecordDict(), dst_node_id=order[0], message_type=MessageType.QUERY)],
                                     timeout=5.0)) == 1   # after close, a new thread serves
    grid.close()


def test_an_inline_client_that_exits_loses_its_reply_and_the_round_goes_on():
    """A client calling sys.exit (not an Exception) ends neither the worker thread nor the round: its reply is
    missing (the server records a dropout) and the clients after it, on the same thread, reply."""
    import sys as _sys

    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid == 1:
            _sys.exit(3)
        return Message(RecordDict({"c": ConfigRecord({"pid": pid})}), reply_to=msg)

    grid = InlineGrid(app, 3, node_seed=0)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = grid.run_id, 1, 0
    pid = {node: int(ctx.node_config["partition-id"]) for node, ctx in grid.contexts.items()}
    order = sorted(grid.get_node_ids(), key=pid.get)
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                                     for n in order], timeout=30.0)
    assert [r.content["c"]["pid"] for r in replies] == [0, 2]
    grid.close()
