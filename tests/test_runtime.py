"""The same config and seed give the same client updates and metrics in-process and on Ray; the audit channel
needs the node's consent as well as the server's request."""

import logging

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from omegaconf import OmegaConf

from fedsim.client_app import AUDIT_FLAG, CONFIG_KEY
from fedsim.protocol import SIMULATED_KEY
from fedsim.client_app import app as client_app
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
