"""defense=toy_sign: its client mod runs in the fedsim client app, configured by name only."""

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsim.api import compose
from fedsim.client_app import app as client_app
from fedsim.data import load_dataset
from fedsim.models import build_model
from fedsim.protocol import CONFIG_KEY
from fedsim.runtime import InlineGrid


def test_the_client_sends_the_sign_of_its_update():
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(compose(["defense=toy_sign", "data=digits", "model.widths=[8]", "fl.clients=2"]),
                                 resolve=True)
    bundle = load_dataset(raw["data"])
    model = build_model(raw["model"], bundle.input_shape, bundle.num_classes, 0)
    grid = InlineGrid(client_app, 2, node_seed=0)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = grid.run_id, 1, 0
    node = next(iter(grid.get_node_ids()))
    config = ConfigRecord({CONFIG_KEY: yaml.safe_dump(raw), "server-round": 1})
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}),
                  dst_node_id=node, message_type=MessageType.TRAIN)
    (reply,) = grid.send_and_receive([msg])
    sent = reply.content["arrays"].to_torch_state_dict()
    assert all(set(torch.unique(v).tolist()) <= {-1.0, 0.0, 1.0} for v in sent.values())
