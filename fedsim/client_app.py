"""The fedsim ClientApp (Flower Message API): local training on one data partition per SuperNode.

Everything a client needs arrives with the instruction: the global model and, in the train ConfigRecord, the run's
configuration (`fedsim.config`, YAML). Defenses and fault injection are client mods built from that configuration
at call time. The same app runs in-process, on Ray's simulation engine and on real SuperNodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from defenses.base import Defense, DefenseContext, build_defense
from defenses.keylock import keylock_mod
from defenses.secagg import secagg_mod
from fedsim.config import FLConfig, RunConfig, validate
from fedsim.faults import InjectedCrash, corrupt, draw_fault
from fedsim.hook import AUDIT_KEY, CLIENT_KEY, audit_record
from fedsim.training import local_update, seed_for, single_thread

CONFIG_KEY = "fedsim.config"   # in the train ConfigRecord: the run's config as YAML
AUDIT_FLAG = "fedsim.audit"    # in the train ConfigRecord: send the batch to the scorer (simulation only)


@dataclass(frozen=True)
class ClientPlan:
    """The part of the run's configuration a client acts on."""

    run: RunConfig
    defense: Defense

    @property
    def fl(self) -> FLConfig:
        return self.run.fl


@lru_cache(maxsize=4)
def client_plan(config_yaml: str) -> ClientPlan:
    run = validate(yaml.safe_load(config_yaml), deep=False)
    return ClientPlan(run, build_defense(run.defense))


def plan_of(msg: Message) -> ClientPlan:
    return client_plan(str(msg.content["config"][CONFIG_KEY]))


def partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise KeyError("this SuperNode has no partition-id in its node config (start it with "
                       "--node-config 'partition-id=N num-partitions=M')")
    return int(context.node_config["partition-id"])


@lru_cache(maxsize=4)
def _client_data(data_key: str, clients: int, partition_key: Any, seed: int, pid: int):
    from fedsim.data import load_dataset
    from fedsim.data.partition import partition

    data = yaml.safe_load(data_key)
    bundle = load_dataset(data)
    idx = torch.as_tensor(partition(bundle.train_y, clients, partition_key, seed)[pid])
    return bundle, bundle.train_x[idx], bundle.train_y[idx]


# --- mods --------------------------------------------------------------------------------------------------------

def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Misbehave when drawn to (faults.*): raise before training, or corrupt the reply after the defense."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    plan = plan_of(msg)
    server_round = int(msg.content["config"]["server-round"])
    fault = draw_fault(plan.run.faults, plan.run.seed, server_round, partition_id(context))
    if fault == "crash":
        raise InjectedCrash(f"injected crash (faults.crash) in round {server_round}")
    out = call_next(msg, context)
    if fault in ("nan", "shape") and not out.has_error():
        arrays = out.content["arrays"].to_torch_state_dict()
        out.content["arrays"] = ArrayRecord(corrupt(arrays, fault))
    return out


def defense_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the configured defense to the update the client is about to send (built at call time)."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    plan = plan_of(msg)
    defense = plan.defense
    if not defense.transforms:  # identity: leave the reply bit for bit as it is
        return call_next(msg, context)
    incoming = {k: v.clone() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
    out = call_next(msg, context)
    if out.has_error():
        return out
    info = out.content[CLIENT_KEY]
    buffers = set(info.get("buffers", []) or [])
    pid, server_round = int(info["partition-id"]), int(msg.content["config"]["server-round"])
    sent = out.content["arrays"].to_torch_state_dict()
    fedsgd = plan.fl.mode == "fedsgd"
    update = {k: (v if fedsgd else v - incoming[k]) for k, v in sent.items() if k not in buffers}
    num_examples = int(out.content["metrics"]["num-examples"])
    gen = torch.Generator().manual_seed(seed_for(plan.run.seed, server_round, pid, 0xDEF))
    ctx = DefenseContext(server_round, pid, plan.fl.mode, num_examples, gen)
    defended = defense.transform(update, ctx)
    arrays = {k: (defended[k] if fedsgd else incoming[k] + defended[k]) if k in defended else v
              for k, v in sent.items()}
    out.content["arrays"] = ArrayRecord(arrays)
    return out


# Outermost first: SecAgg+ (protocol messages only), faults, the update transform, key-lock's private layers.
app = ClientApp(mods=[secagg_mod, fault_mod, defense_mod, keylock_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random per run; partition ids are not)."""
    return Message(RecordDict({CLIENT_KEY: ConfigRecord({"partition-id": partition_id(context)})}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Accuracy of the global model on the test split, as this client runs it (e.g. with its private key-lock
    layers, which its mods restore); sent only by strategies that ask clients to evaluate."""
    plan = plan_of(msg)
    run = plan.run
    bundle, _, _ = _client_data(yaml.safe_dump(run.data), run.fl.clients, run.partition, run.seed, partition_id(context))

    from fedsim.models import build_model
    from fedsim.training import evaluate

    model = plan.defense.build_model(build_model(run.model, bundle.input_shape, bundle.num_classes, run.seed),
                                     private=True)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    with single_thread():
        accuracy, loss = evaluate(model, bundle.test_x, bundle.test_y)
    return Message(RecordDict({"metrics": MetricRecord({"accuracy": accuracy, "loss": loss,
                                                        "num-examples": len(bundle.test_y)}),
                               CLIENT_KEY: ConfigRecord({"partition-id": partition_id(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    plan = plan_of(msg)
    run, fl = plan.run, plan.fl
    pid = partition_id(context)
    server_round = int(msg.content["config"]["server-round"])
    bundle, x, y = _client_data(yaml.safe_dump(run.data), fl.clients, run.partition, run.seed, pid)

    from fedsim.models import build_model

    model = plan.defense.build_model(build_model(run.model, bundle.input_shape, bundle.num_classes, run.seed),
                                     private=True)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    gen = torch.Generator().manual_seed(seed_for(run.seed, server_round, pid))
    with single_thread():
        result = local_update(model, x, y, mode=fl.mode, batch_size=fl.batch_size, local_steps=fl.local_steps,
                              lr=fl.lr, gen=gen)
    content = RecordDict({
        "arrays": ArrayRecord(result.arrays),
        "metrics": MetricRecord({"num-examples": result.num_examples, "train_loss": result.loss}),
        CLIENT_KEY: ConfigRecord({"partition-id": pid, "buffers": result.buffers}),
    })
    if bool(msg.content["config"].get(AUDIT_FLAG, False)):
        content[AUDIT_KEY] = audit_record(x[result.used], y[result.used])
    return Message(content, reply_to=msg)
