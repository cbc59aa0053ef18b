"""quickstart: the ClientApp. `audited_app` is the same app with fedsim's audit mod (the only fedsim line)."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim import audit_mod
from tests.flowerapps.quickstart.task import Net, load_data, test as test_fn, train as train_fn

app = ClientApp()
audited_app = ClientApp(mods=[audit_mod])


def train(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    partition_id = int(context.node_config["partition-id"])
    torch.manual_seed(100 * int(msg.content["config"]["server-round"]) + partition_id)  # the shuffle
    trainloader, _ = load_data(partition_id, int(context.node_config["num-partitions"]))
    epochs, lr = int(context.run_config["local-epochs"]), float(msg.content["config"]["lr"])
    train_loss = train_fn(model, trainloader, epochs, lr)
    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(trainloader.dataset)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, testloader = load_data(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
    eval_loss, eval_acc = test_fn(model, testloader)
    metrics = MetricRecord({"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": len(testloader.dataset)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


for client in (app, audited_app):
    client.train()(train)
    client.evaluate()(evaluate)
