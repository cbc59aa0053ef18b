"""Secure aggregation with Flower's SecAgg+ (`defense=secagg`): the server learns only the round's aggregate.

Flower 1.41 ships SecAgg+ only on its legacy path: the server side is `SecAggPlusWorkflow` (driven by a
`LegacyContext` and a legacy strategy), the client side `secaggplus_mod` around a handler that speaks legacy
FitIns/FitRes records. fedsim runs both unchanged and adapts at the edges:

- Server: `SecAggGrid` wraps the Grid the strategy talks through. When the strategy sends its train instructions,
  the grid runs one whole SecAgg+ round (setup, share keys, collect masked vectors, unmask) with Flower's workflow
  over the real grid, and answers every participating node with the same unmasked aggregate, exactly as Flower's
  workflow hands its legacy strategy one identical FitRes per client. The replies carry `fedsim.hook.AGGREGATE_KEY`,
  so the curious hook attacks the aggregate once, as one large batch (SPEAR's effective batch is the sum of the
  clients' batches), and records that no individual update was observable.
- Client: `secagg_mod`, the outermost mod, runs `secaggplus_mod` for messages of the protocol only, and translates
  the collect-masked-vectors instruction into a plain fedsim train message (and the reply back), so the fault,
  defense and key-lock mods and the train handler below it run as in every other round.

What the aggregate is: SecAgg+ computes the weighted mean `sum_k w_k u_k / sum_k w_k` (w = num-examples) of what
clients send (the gradient in FedSGD, the weights in FedAvg), each client's values clipped to
[-clipping_range, clipping_range], scaled by its quantised weight and stochastically rounded to
`quantization_range` levels. The error of each coordinate is at most
`K * 2 * clipping_range / quantization_range / sum_k (w_k / max_weight)` for K clients; `max_weight` defaults to the
largest weight a client can report in the run (the best resolution without overflow).

Simulation only: clients' audit records (their true batches, for the scorer) ride along the masked-vector replies;
`SecAggGrid` takes them off before Flower's workflow sees the replies and hands the scorer their union.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.app import Context as FlwrContext
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, parameters_to_arrayrecord
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedsim.defenses.base import ClientMod, Defense, register_defense
from fedsim.data import load_dataset
from fedsim.data.partition import partition
from fedsim.errors import ConfigError, FedsimError
from fedsim.grids import WrappedGrid
from fedsim.protocol import (
    AGGREGATE_KEY,
    AUDIT_KEY,
    CLIENT_KEY,
    CONFIG_KEY,
    ROUND_KEY,
    audit_record,
    partition_id,
    read_audit,
)
from fedsim.schema import knob
from fedsim.seeds import SECAGG_ROUNDING_STREAM, seed_for

log = logging.getLogger("fedsim")

NAMES_KEY = "fedsim.names"       # in the legacy FitIns config: the names of the arrays, in order
_FITINS, _FITRES = "fitins", "fitres"


@dataclass(frozen=True)
class SecAggConfig:
    num_shares: int | float = knob(1.0, gt=0, help="shares of each client's secrets: an int > 2, or a fraction "
                                                     "of the round's clients (1.0: every client)")
    reconstruction_threshold: int | float = knob(0.5, gt=0, help="shares needed to rebuild a secret: an int, or a "
                                                                   "fraction of num_shares")
    clipping_range: float = knob(8.0, gt=0, help="every sent value is clipped to [-r, r] before quantisation")
    quantization_range: int = knob(2**22, ge=2, help="quantisation levels over [-clipping_range, clipping_range]")
    modulus_range: int = knob(2**32, ge=4, help="modulus of the masks, a power of 2 > quantization_range")
    max_weight: float | None = knob(None, gt=0, help="largest client weight (num-examples); null: the largest a "
                                                       "client can report in this run")
    timeout: float | None = knob(None, gt=0, help="seconds to wait for each stage's replies; null: fl.timeout")


@register_defense("secagg")
class SecAgg(Defense):
    """Flower's SecAgg+: clients mask their quantised updates so the server can only unmask their sum."""

    name = "secagg"
    Config = SecAggConfig

    def strength(self) -> dict[str, float | str]:
        cfg = self.config
        return {"num_shares": cfg.num_shares, "threshold": cfg.reconstruction_threshold,
                "quantization_range": cfg.quantization_range}

    def validate(self, prefix: str) -> None:
        cfg = self.config
        m = cfg.modulus_range
        if m & (m - 1) or m <= cfg.quantization_range or m > 2**32:
            raise ConfigError(f"{prefix}.modulus_range", m,
                              f"a power of 2 above quantization_range={cfg.quantization_range} and at most 2**32")
        if isinstance(cfg.num_shares, int) and cfg.num_shares <= 2 and cfg.num_shares != 1:
            raise ConfigError(f"{prefix}.num_shares", cfg.num_shares, "an integer > 2, or a fraction like 1.0")
        if isinstance(cfg.reconstruction_threshold, float) and cfg.reconstruction_threshold > 1:
            raise ConfigError(f"{prefix}.reconstruction_threshold", cfg.reconstruction_threshold,
                              "an integer, or a fraction in (0, 1]")
        if (isinstance(cfg.num_shares, int) and isinstance(cfg.reconstruction_threshold, int)
                and cfg.reconstruction_threshold >= cfg.num_shares):
            raise ConfigError(f"{prefix}.reconstruction_threshold", cfg.reconstruction_threshold,
                              f"less than num_shares={cfg.num_shares}")

    def check_run(self, run, prefix: str = "defense") -> None:
        per_round = run.fl.clients_per_round or run.fl.clients
        if per_round < 2:
            raise ConfigError("fl.clients_per_round" if run.fl.clients_per_round else "fl.clients", per_round,
                              "at least 2 clients per round with defense=secagg (a sum of one is that update)")
        cfg = self.config
        if per_round * cfg.quantization_range >= cfg.modulus_range:
            raise ConfigError(f"{prefix}.quantization_range", cfg.quantization_range,
                              f"below modulus_range / clients per round = {cfg.modulus_range // per_round} "
                              "(the masked sum would overflow)")

    def client_mods(self) -> list[ClientMod]:
        """Outermost on the client: SecAgg+'s own stages, around the train message it turns into a plain one."""
        return [ClientMod("protocol", lambda msg, context, call_next, client: secagg_mod(msg, context, call_next))]

    def wrap_grid(self, grid: Grid, run) -> Grid:
        cfg = self.config
        return SecAggGrid(grid, cfg, max_weight=cfg.max_weight or max_weight(run),
                          timeout=cfg.timeout or run.fl.timeout, batch_size=run.fl.batch_size, mode=run.fl.mode)


def max_weight(run) -> float:
    """The largest num-examples a client reports in `run`: its batch in FedSGD, its partition in FedAvg."""
    if run.fl.mode == "fedsgd":
        return float(run.fl.batch_size)
    bundle = load_dataset(run.data)
    return float(max(len(p) for p in partition(bundle.train_y, run.fl.clients, run.partition, run.seed)))


def quantisation_bound(cfg: SecAggConfig, weights: list[float], max_weight_: float) -> float:
    """Largest error per coordinate of the SecAgg+ weighted mean (stochastic rounding of each client's values)."""
    ratios = [round(w / max_weight_ * cfg.quantization_range) / cfg.quantization_range for w in weights]
    return len(weights) * 2 * cfg.clipping_range / cfg.quantization_range / sum(ratios)


# --- client side ---------------------------------------------------------------------------------------------------

def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for SecAgg+ protocol messages; every other message passes through untouched."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    fit_config = msg.content.config_records.get(f"{_FITINS}.config")
    if fit_config is not None:   # the stage that trains, then quantises the update (Flower's stochastic rounding)
        np.random.seed(_rounding_seed(fit_config, context))
    return secaggplus_mod(msg, context, _speak_legacy(call_next))


def _rounding_seed(fit_config: ConfigRecord, context: Context) -> int:
    """Flower's SecAgg+ quantiser rounds stochastically with numpy's global generator; seeding it from (run seed,
    round, partition) makes the aggregate, and so the whole run, repeat exactly. The masks use their own secrets."""
    run_seed = int(yaml.safe_load(str(fit_config[CONFIG_KEY])).get("seed", 0)) if CONFIG_KEY in fit_config else 0
    return seed_for(run_seed, int(fit_config.get(ROUND_KEY, 0)), partition_id(context),
                    SECAGG_ROUNDING_STREAM) % 2**32


def _speak_legacy(call_next: ClientAppCallable) -> ClientAppCallable:
    """Wrap a fedsim train handler (arrays + config in, arrays + metrics out) as a legacy FitIns -> FitRes one."""
    def handler(msg: Message, context: Context) -> Message:
        content = msg.content
        config = dict(content.config_records.pop(f"{_FITINS}.config"))
        names = json.loads(str(config.pop(NAMES_KEY)))
        legacy = content.array_records.pop(f"{_FITINS}.parameters")
        arrays = parameters_to_ndarrays(arrayrecord_to_parameters(legacy, keep_input=True))
        content["arrays"] = ArrayRecord({n: Array(a.copy(order="C")) for n, a in zip(names, arrays)})
        content["config"] = ConfigRecord(config)
        out = call_next(msg, context)
        if out.has_error():
            raise FedsimError(f"training failed inside the SecAgg+ round: {out.error.reason}")
        reply = out.content
        sent = reply.array_records.pop("arrays")
        metrics = dict(reply.metric_records.pop("metrics"))
        num_examples = int(metrics.pop("num-examples"))
        ordered = [sent[n].numpy() for n in names]
        reply[f"{_FITRES}.parameters"] = parameters_to_arrayrecord(ndarrays_to_parameters(ordered), keep_input=True)
        reply[f"{_FITRES}.num_examples"] = MetricRecord({"num_examples": num_examples})
        reply[f"{_FITRES}.metrics"] = ConfigRecord({k: v for k, v in metrics.items()})
        reply[f"{_FITRES}.status"] = ConfigRecord({"code": 0, "message": "Success"})
        return out

    return handler


# --- server side ---------------------------------------------------------------------------------------------------

class SecAggGrid(WrappedGrid):
    """A Grid that turns each broadcast of train instructions into one SecAgg+ round over the inner grid.

    Everything else (queries, evaluation) passes through. `last_round` keeps what the server held after the most
    recent secure round (for tests and records): the replies of each stage as they arrived, minus audit records.
    """

    def __init__(self, inner: Grid, cfg: SecAggConfig, *, max_weight: float, timeout: float | None = None,
                 batch_size: int | None = None, mode: str = "fedsgd") -> None:
        super().__init__(inner)
        self.cfg, self.max_weight, self.timeout = cfg, float(max_weight), timeout
        self.batch_size, self.mode = batch_size, mode
        self.last_round: _RoundLog | None = None

    # -- everything but train broadcasts passes through (WrappedGrid) ----------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if any(_is_train_instruction(m) for m in messages):
            raise FedsimError("under defense=secagg, train instructions must go through send_and_receive "
                              "(each is one SecAgg+ round)")
        return self.inner.push_messages(messages)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if messages and all(_is_train_instruction(m) for m in messages):
            return self.secure_round(messages)
        return self.inner.send_and_receive(messages, timeout=timeout)

    # -- one SecAgg+ round --------------------------------------------------------------------------------------
    def secure_round(self, messages: list[Message]) -> list[Message]:
        """Run Flower's SecAgg+ workflow for these train instructions; one reply per node, all the aggregate."""
        first = messages[0]
        server_round = int(first.content["config"].get("server-round", first.metadata.group_id or 0))
        names = list(first.content["arrays"].keys())
        dtypes = {n: first.content["arrays"][n].numpy().dtype for n in names}
        shapes = {n: first.content["arrays"][n].numpy().shape for n in names}  # SecAgg+ returns scalars as (1,)
        instructions = {}
        for msg in messages:
            arrays = msg.content["arrays"]
            if list(arrays.keys()) != names:
                raise FedsimError("SecAgg+ needs every client to receive the same arrays")
            config = dict(msg.content["config"])
            config[NAMES_KEY] = json.dumps(names)
            params = ndarrays_to_parameters([arrays[n].numpy() for n in names])
            instructions[msg.metadata.dst_node_id] = FitIns(params, config)
        if self.mode == "fedavg":
            peak = max(float(np.abs(first.content["arrays"][n].numpy()).max(initial=0.0)) for n in names)
            if peak > self.cfg.clipping_range:
                log.warning("secagg: model values up to %.3g exceed clipping_range=%g; SecAgg+ clips what clients "
                            "send (their weights in FedAvg)", peak, self.cfg.clipping_range)

        relay = _Relay(instructions, self.inner)
        tap = _AuditTap(self.inner)
        context = LegacyContext(FlwrContext(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                config=ServerConfig(num_rounds=1), strategy=relay)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(
            next(iter(instructions.values())).parameters, keep_input=True)
        cfg = self.cfg
        workflow = SecAggPlusWorkflow(cfg.num_shares, cfg.reconstruction_threshold, max_weight=self.max_weight,
                                      clipping_range=cfg.clipping_range, quantization_range=cfg.quantization_range,
                                      modulus_range=cfg.modulus_range, timeout=self.timeout)
        workflow(tap, context)
        self.last_round = tap.log

        by_node = {m.metadata.dst_node_id: m for m in messages}
        if relay.aggregate is None:
            reason = f"the SecAgg+ round {server_round} did not complete (too few clients stayed)"
            return [Message(Error(code=0, reason=reason), reply_to=m) for m in messages]
        aggregate = parameters_to_ndarrays(relay.aggregate)
        arrays = ArrayRecord({n: Array(_cast(a.reshape(shapes[n]), dtypes[n])) for n, a in zip(names, aggregate)})
        contributors = [nid for nid, _ in relay.results]
        clients = [int(tap.client_records[n]["partition-id"]) for n in contributors if n in tap.client_records]
        total = int(sum(res.num_examples for _, res in relay.results))
        info = {"clients": sorted(clients), "num-examples": total, "secure": True}
        if self.batch_size is not None:
            info["batch-size"] = self.batch_size * len(contributors)
        replies = []
        truth = tap.union_audit(contributors)
        for i, (nid, res) in enumerate(relay.results):
            metrics = {"num-examples": int(res.num_examples)}
            metrics.update({k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))})
            content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                                  AGGREGATE_KEY: ConfigRecord(info)})
            if nid in tap.client_records:
                content[CLIENT_KEY] = tap.client_records[nid]
            if i == 0 and truth is not None:
                content[AUDIT_KEY] = truth
            replies.append(Message(content, reply_to=by_node[nid]))
        for nid, msg in by_node.items():
            if nid not in {n for n, _ in relay.results}:
                replies.append(Message(Error(code=0, reason=f"dropped out of SecAgg+ round {server_round}"),
                                       reply_to=msg))
        return replies


def _is_train_instruction(msg: Message) -> bool:
    return (msg.metadata.message_type == MessageType.TRAIN and msg.has_content()
            and "arrays" in msg.content.array_records and "config" in msg.content.config_records)


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` as `dtype` (integers rounded), C-contiguous, 0-d arrays kept 0-d (np.ascontiguousarray makes them 1-d)."""
    if np.issubdtype(dtype, np.integer):
        array = np.rint(array)
    return np.array(array, dtype=dtype, order="C", copy=True)


@dataclass
class _RoundLog:
    """What crossed the server during one SecAgg+ round: per stage, the record names of each reply."""

    stages: list[list[dict]]

    def individual_arrays(self) -> int:
        """Non-empty arrays the server received from clients in the round (0: it never held a plain update)."""
        return sum(entry["arrays"] for stage in self.stages for entry in stage)


class _AuditTap(WrappedGrid):
    """The grid Flower's workflow talks through: takes the audit and client records off replies, logs the rest."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.audits: dict[int, ConfigRecord] = {}
        self.client_records: dict[int, ConfigRecord] = {}
        self.log = _RoundLog([])

    def on_replies(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        stage = []
        for reply in replies:
            if reply.has_error():
                stage.append({"node": reply.metadata.src_node_id, "error": True, "arrays": 0})
                continue
            node = reply.metadata.src_node_id
            audit = reply.content.config_records.pop(AUDIT_KEY, None)
            if audit is not None:
                self.audits[node] = audit
            client = reply.content.config_records.pop(CLIENT_KEY, None)
            if client is not None:
                self.client_records[node] = client
            nonempty = sum(1 for rec in reply.content.array_records.values() for _ in rec.keys())
            stage.append({"node": node, "error": False, "arrays": nonempty,
                          "records": sorted(reply.content.keys())})
        self.log.stages.append(stage)
        return replies

    def union_audit(self, nodes: list[int]) -> ConfigRecord | None:
        """The true batches of `nodes`, concatenated in order of partition id (for the scorer only)."""
        if not nodes or any(n not in self.audits for n in nodes):
            return None
        order = sorted(nodes, key=lambda n: int(self.client_records[n]["partition-id"])
                       if n in self.client_records else n)
        truths = [read_audit(self.audits[n]) for n in order]
        return audit_record(torch.cat([t.inputs for t in truths]), torch.cat([t.labels for t in truths]))


class _Relay:
    """A legacy strategy for one SecAgg+ round: hands out the prepared FitIns and keeps the unmasked result."""

    def __init__(self, instructions: dict, grid: Grid) -> None:
        try:
            run_id = grid.run.run_id
        except Exception:  # a grid without a run: the proxies are never asked to send anything
            run_id = 0
        self.instructions = instructions
        self.proxies = {nid: GridClientProxy(nid, grid, run_id) for nid in instructions}
        self.results: list = []         # (node id, FitRes), FitRes.parameters = the aggregate
        self.aggregate = None

    # legacy Strategy interface (duck-typed: SecAggPlusWorkflow calls configure_fit and aggregate_fit only)
    def configure_fit(self, server_round, parameters, client_manager):
        return [(self.proxies[nid], fitins) for nid, fitins in self.instructions.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = [(proxy.node_id, res) for proxy, res in results]
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}
