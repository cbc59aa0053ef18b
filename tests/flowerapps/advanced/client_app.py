"""advanced: the ClientApp; each client keeps its own `head` in its context between rounds (personalisation).
`audited_app` adds fedsim's audit mod."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim import audit_mod
from tests.flowerapps.advanced.task import Net, load_data, train as train_fn

app = ClientApp()
audited_app = ClientApp(mods=[audit_mod])


def train(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    if "head" in context.state.array_records:  # this client's own head replaces the global one
        model.head.load_state_dict(context.state["head"].to_torch_state_dict())
    partition_id = int(context.node_config["partition-id"])
    torch.manual_seed(100 * int(msg.content["config"]["server-round"]) + partition_id)
    trainloader = load_data(partition_id)
    loss = train_fn(model, trainloader, int(context.run_config["local-epochs"]), float(msg.content["config"]["lr"]))
    context.state["head"] = ArrayRecord(model.head.state_dict())
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(trainloader.dataset)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


for client in (app, audited_app):
    client.train()(train)
