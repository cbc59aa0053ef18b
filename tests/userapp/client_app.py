"""The user's ClientApp. `audited_app` is the same app with fedsim's audit mod added (the only fedsim line)."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from tests.userapp.task import MODELS, load_partition, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    config = msg.content["config"]
    torch.manual_seed(1000 * int(config["server-round"]) + pid)
    net = MODELS[str(config["model"])]()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_partition(pid)
    train(net, x, y, lr=float(config["lr"]))
    return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()),
                               "metrics": MetricRecord({"num-examples": len(x)})}), reply_to=msg)


from fedsim import audit_mod  # noqa: E402  (variant 2: the audit mod)

audited_app = ClientApp(mods=[audit_mod])
audited_app.train()(train_fn)
