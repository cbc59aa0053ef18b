"""The fedsim ClientApp (Flower Message API): local training on one data partition per SuperNode.

Everything a client needs arrives with the instruction: the global model and, in the train ConfigRecord, the run's
configuration (`fedsim.config`, YAML). Defenses and fault injection are client mods built from that configuration
at call time (`client_mods`, the app's one Flower mod): the chain is, outermost first, the "protocol" mods the
configured defenses declare (`Defense.client_mods`, e.g. SecAgg+), fault injection, the update transform, what is
sent (buffers or not), the "model" mods the defenses declare (e.g. key-lock's private layers), then the train
handler; a mod with nothing to do under the configuration is not in it (`ClientPlan.chain`). The same app runs
in-process, on Ray's simulation engine and on real SuperNodes.

Layer: the federation (with the server app, the hook, run validation and recording); imports the core, data,
models, attacks and defenses, never a runtime.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial
from typing import Any

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedsim.defenses.base import ClientMod, Defense, DefenseContext, build_defense
from fedsim.arrays import to_record, to_state_dict
from fedsim.config import FLConfig, RunConfig, validate
from fedsim.data import load_dataset
from fedsim.data.partition import partition
from fedsim.faults import BAD_EXAMPLES, DTYPE_FORMS, InjectedCrash, corrupt, draw_fault, variant
from fedsim.models import build_model
from fedsim.protocol import (
    AUDIT_FLAG,
    AUDIT_KEY,
    CLIENT_KEY,
    CONFIG_KEY,
    PARTITIONS_KEY,
    ROUND_KEY,
    audit_record,
    may_audit,
    partition_id,
)
from fedsim.seeds import DEFENSE_STREAM, seed_for
from fedsim.training import evaluate, local_update, single_thread

PLAN_KEY = "fedsim.plan"       # in a node's Context.state: the run's config it last received (SecAgg+ stages carry none)


@dataclass(frozen=True)
class ClientPlan:
    """The part of the run's configuration a client acts on, with what it needs built once per process."""

    run: RunConfig
    defense: Defense

    @property
    def fl(self) -> FLConfig:
        return self.run.fl

    def data(self, pid: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(dataset bundle, inputs, labels) of partition `pid`."""
        bundle, parts = self._partitions
        return bundle, bundle.train_x[parts[pid]], bundle.train_y[parts[pid]]

    def model(self) -> torch.nn.Module:
        """The model to load the server's weights into. One object serves every message of this process: the
        server's state dict sets all of its state (a model with state outside its state dict gets a fresh copy)."""
        return self._model if self._model_is_reusable else copy.deepcopy(self._model)

    # Built on first use and kept: a process running many clients (inline, a Ray actor) pays for them once.
    @cached_property
    def _partitions(self) -> tuple[Any, list[torch.Tensor]]:
        bundle = load_dataset(self.run.data)
        parts = partition(bundle.train_y, self.fl.clients, self.run.partition, self.run.seed)
        return bundle, [torch.as_tensor(p) for p in parts]

    @cached_property
    def _model(self) -> torch.nn.Module:
        bundle = self._partitions[0]
        # with its private parts (e.g. key-lock layers, whose values the client's mods restore from its state)
        return self.defense.build_model(build_model(self.run.model, bundle.input_shape, bundle.num_classes,
                                                    self.run.seed), private=True)

    @cached_property
    def _model_is_reusable(self) -> bool:
        persistent = set(self._model.state_dict())
        return all(name in persistent for name, _ in self._model.named_buffers())

    def mods(self, position: str) -> list[ClientMod]:
        """The client mods the configured defenses declare at `position`, outermost first."""
        return [m for m in self.defense.client_mods() if m.position == position]

    @cached_property
    def chain(self) -> tuple[Mod, ...]:
        """The Flower mods this configuration runs, outermost first: the defenses' "protocol" mods, fault
        injection, the update transform, dropping the buffers, the defenses' "model" mods. A mod that would pass
        every message through unchanged under this configuration is left out (no faults: no `fault_mod`; a defense
        that transforms nothing: no `defense_mod`; buffers sent: no `buffers_mod`), so a plain run pays for none."""
        return (*(_with_plan(m.mod, self) for m in self.mods("protocol")),
                *((fault_mod,) if self.run.faults.any else ()),
                *((defense_mod,) if self.defense.transforms else ()),
                *(() if self.fl.send_buffers else (buffers_mod,)),
                *(_with_plan(m.mod, self) for m in self.mods("model")))


@lru_cache(maxsize=4)
def client_plan(config_yaml: str) -> ClientPlan:
    run = validate(yaml.safe_load(config_yaml), deep=False)
    return ClientPlan(run, build_defense(run.defense))


def plan_of(msg: Message) -> ClientPlan:
    return client_plan(str(msg.content["config"][CONFIG_KEY]))


def _config_of(msg: Message, context: Context) -> str | None:
    """The run's config the message carries (remembered in the node's state), else the one it last carried."""
    record = msg.content.get("config") if msg.has_content() else None  # not `config_records`: a synced view
    remembered = context.state.get(PLAN_KEY)
    if isinstance(record, ConfigRecord) and CONFIG_KEY in record:
        config = str(record[CONFIG_KEY])
        if not isinstance(remembered, ConfigRecord) or remembered.get(CONFIG_KEY) != config:
            context.state[PLAN_KEY] = ConfigRecord({CONFIG_KEY: config})
        return config
    return str(remembered[CONFIG_KEY]) if isinstance(remembered, ConfigRecord) and CONFIG_KEY in remembered else None


def client_mods(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """fedsim's one Flower mod: runs the mods the run's configuration calls for (`ClientPlan.chain`) around the
    handler. Built at call time: the configuration arrives with the messages (a message without one, as SecAgg+'s
    stages, runs under the one the node last received; before any, no mod has a say)."""
    config = _config_of(msg, context)
    if config is None:
        return call_next(msg, context)
    chain = call_next
    for mod in reversed(client_plan(config).chain):
        chain = partial(mod, call_next=chain)
    return chain(msg, context)


def _with_plan(mod, plan: ClientPlan) -> Mod:
    """A declared client mod (`mod(msg, context, call_next, plan)`) as a Flower mod."""

    def flower_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return mod(msg, context, call_next, plan)

    flower_mod.__name__ = getattr(mod, "__name__", "declared_mod")
    return flower_mod


# --- mods --------------------------------------------------------------------------------------------------------

def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Misbehave when drawn to (faults.*): raise before training, or tamper with the reply after the defense."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    plan = plan_of(msg)
    server_round = int(msg.content["config"][ROUND_KEY])
    pid = partition_id(context)
    seed = plan.run.seed
    fault = draw_fault(plan.run.faults, seed, server_round, pid)
    if fault == "crash":
        raise InjectedCrash(f"injected crash (faults.crash) in round {server_round}")
    out = call_next(msg, context)
    if fault is None or out.has_error():
        return out
    if fault in ("nan", "shape", "huge", "dtype"):
        arrays = out.content["arrays"].to_torch_state_dict()
        form = variant(seed, server_round, pid, len(DTYPE_FORMS))
        out.content["arrays"] = ArrayRecord(corrupt(arrays, fault, form))
    elif fault == "examples":
        out.content["metrics"]["num-examples"] = BAD_EXAMPLES[variant(seed, server_round, pid, len(BAD_EXAMPLES))]
    elif fault == "audit":
        out.content[AUDIT_KEY] = ConfigRecord({"x": b"\x00" * 7, "x_shape": [3, 0, -1], "y": [1, 2]})
    elif fault == "impersonate":
        info = dict(out.content[CLIENT_KEY])
        out.content[CLIENT_KEY] = ConfigRecord({**info, "partition-id": (pid + 1) % plan.fl.clients})
    elif fault == "slow":
        time.sleep(plan.run.faults.slow_seconds)  # after training: a client left behind computes nothing more
    return out


def defense_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the configured defense to everything the client is about to send (built at call time).

    The defense transforms one update: the gradient (FedSGD) or weight delta (FedAvg) of every parameter, and the
    change of every floating-point buffer it sends (BatchNorm running statistics: `sent - received`), so that
    clipping and noise bound all the client releases. Integer buffers (BatchNorm's `num_batches_tracked`) count
    local steps, which do not depend on the data, and are sent as they are. Noised running variances are clamped
    at zero afterwards (post-processing).
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    plan = plan_of(msg)
    defense = plan.defense
    if not defense.transforms:  # identity: leave the reply bit for bit as it is
        return call_next(msg, context)
    incoming = to_state_dict(msg.content["arrays"])
    out = call_next(msg, context)
    if out.has_error():
        return out
    info = out.content[CLIENT_KEY]
    buffers = set(info.get("buffers", []) or [])
    pid, server_round = int(info["partition-id"]), int(msg.content["config"]["server-round"])
    sent = to_state_dict(out.content["arrays"])
    fedsgd = plan.fl.mode == "fedsgd"
    as_delta = {k for k in sent if k in incoming and (not fedsgd or k in buffers)}
    update = {k: (v - incoming[k] if k in as_delta else v) for k, v in sent.items()
              if k not in buffers or v.is_floating_point()}
    num_examples = int(out.content["metrics"]["num-examples"])
    gen = torch.Generator().manual_seed(seed_for(plan.run.seed, server_round, pid, DEFENSE_STREAM))
    ctx = DefenseContext(server_round, pid, plan.fl.mode, num_examples, gen)
    defended = defense.transform(update, ctx)
    arrays = {k: ((incoming[k] + defended[k]) if k in as_delta else defended[k]) if k in defended else v
              for k, v in sent.items()}
    # Post-processing (it leaves any privacy guarantee as it is): a variance the noise pushed below zero is no
    # variance; the model, and the average of the clients' models, would compute NaN with it.
    arrays = {k: v.clamp_min(0.0) if k in buffers and k.endswith("running_var") else v for k, v in arrays.items()}
    out.content["arrays"] = to_record(arrays)
    return out


def buffers_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """`fl.send_buffers=false`: the client's buffers (BatchNorm statistics) are left out of what it sends (FedBN);
    the server keeps its own. They are dropped here, on the client, so the server never receives them."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    out = call_next(msg, context)
    if out.has_error() or plan_of(msg).fl.send_buffers:
        return out
    info = out.content[CLIENT_KEY]
    buffers = set(info.get("buffers", []) or [])
    sent = to_state_dict(out.content["arrays"])
    out.content["arrays"] = to_record({k: v for k, v in sent.items() if k not in buffers})
    out.content[CLIENT_KEY] = ConfigRecord({**dict(info), "buffers": []})
    return out


class FedsimClientApp(ClientApp):
    """Flower's ClientApp, pickled by reference (`fedsim.client_app.app`): Flower's Simulation Engine sends the
    app with every message to a Ray actor, and pickled by value (its mods, handlers and closures: 4.7 kB) that
    cost 1-1.5 ms of the driver's CPU and 0.25-0.5 ms of the actor's per message on a busy 2-core machine."""

    def __reduce__(self):
        return _fedsim_client_app, ()


def _fedsim_client_app() -> ClientApp:
    return app


# One mod, which runs those the configuration calls for (`ClientPlan.chain`), outermost first: the defenses'
# protocol mods (SecAgg+), faults, the update transform, what is sent (buffers or not), the defenses' model mods
# (key-lock's private layers).
app = FedsimClientApp(mods=[client_mods])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random per run; partition ids are not), and
    of how many (a SuperNode's operator states both). Given the run's config, prepare for training first."""
    info = {"partition-id": partition_id(context)}
    if "config" in msg.content.config_records and CONFIG_KEY in msg.content["config"]:
        plan = plan_of(msg)  # get ready for the first round: load the data, build the model
        if partition_id(context) < plan.fl.clients:
            plan.data(partition_id(context))
            plan.model()
    if PARTITIONS_KEY in context.node_config:
        info[PARTITIONS_KEY] = int(context.node_config[PARTITIONS_KEY])
    return Message(RecordDict({CLIENT_KEY: ConfigRecord(info)}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Accuracy of the global model on the test split, as this client runs it (e.g. with its private key-lock
    layers, which its mods restore); sent only by strategies that ask clients to evaluate."""
    plan = plan_of(msg)
    bundle, _, _ = plan.data(partition_id(context))
    model = plan.model()
    with single_thread():
        model.load_state_dict(to_state_dict(msg.content["arrays"]))
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
    _, x, y = plan.data(pid)
    model = plan.model()
    gen = torch.Generator().manual_seed(seed_for(run.seed, server_round, pid))
    with single_thread():  # loading too: torch splits a 64k-element copy across threads, slow on a busy machine
        model.load_state_dict(to_state_dict(msg.content["arrays"]))
        result = local_update(model, x, y, mode=fl.mode, batch_size=fl.batch_size, local_steps=fl.local_steps,
                              lr=fl.lr, gen=gen)
    content = RecordDict({
        "arrays": to_record(result.arrays),  # ArrayRecord(result.arrays), the same bytes at half the cost
        "metrics": MetricRecord({"num-examples": result.num_examples, "train_loss": result.loss}),
        CLIENT_KEY: ConfigRecord({"partition-id": pid, "buffers": result.buffers}),
    })
    # the server asks, and the node agrees (simulated, or its operator opted in): never the server's say-so alone
    if bool(msg.content["config"].get(AUDIT_FLAG, False)) and may_audit(context):
        content[AUDIT_KEY] = audit_record(x[result.used], y[result.used])
    return Message(content, reply_to=msg)
