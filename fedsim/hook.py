"""The honest-but-curious server: observe -> attack -> score -> record.

`CuriousStrategy` wraps any Message-API strategy as the outermost layer. Each round it remembers the global model
it sent; when replies arrive it checks them for faults, turns every healthy targeted reply into an `Observation`
(every array the client sent, BatchNorm statistics included, plus the training facts the threat model grants),
runs the attacks, and hands each reconstruction with the ground truth to the scorer (an attack that raised is
scored as recovering nothing). Ground truth arrives, in simulation only, as an audit record in the reply; it is stripped before anything
else sees the reply and never reaches an attack. Aggregation is left to the wrapped strategy, unchanged.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor, nn

from attacks.base import Attack
from fedsim.arrays import to_numpy
from fedsim.threat import Normalization, Observation, Reconstruction, TrainMeta

log = logging.getLogger("fedsim")

AUDIT_KEY = "fedsim.audit"    # ConfigRecord with the client's true batch (simulation only)
CLIENT_KEY = "fedsim.client"  # ConfigRecord with the client's partition id and the names of its buffers
GRANT_KEY = "fedsim.grant"    # ConfigRecord with defense secrets the threat model grants the attacker (simulation)
AGGREGATE_KEY = "fedsim.aggregate"  # ConfigRecord on replies that carry a secure aggregate, not one client's update
AGGREGATE_CLIENT = -1         # the client id under which attacks on an aggregate are recorded


# --- ground truth: only the scorer handles it ------------------------------------------------------------------

@dataclass(frozen=True)
class GroundTruth:
    """The samples a client trained on this round. inputs: (b, *shape) in model space; labels: (b,).

    partition: (N, *shape), model space: the client's whole training partition (it holds the batch), when the
    server side of the simulation knows it; the scorer's reference for `identified`.
    """

    inputs: Tensor
    labels: Tensor
    partition: Tensor | None = None


def audit_record(inputs: Tensor, labels: Tensor) -> ConfigRecord:
    """Pack a client's batch for the audit channel (float32 bytes + shape + labels)."""
    x = inputs.detach().cpu().float().contiguous()
    return ConfigRecord({"x": x.numpy().tobytes(), "x_shape": list(x.shape), "y": labels.cpu().tolist()})


def read_audit(record: ConfigRecord) -> GroundTruth:
    shape = tuple(int(s) for s in record["x_shape"])
    x = torch.from_numpy(np.frombuffer(record["x"], dtype=np.float32).copy()).reshape(shape)
    return GroundTruth(x, torch.tensor(list(record["y"]), dtype=torch.int64))


# --- what the server is assumed to know ----------------------------------------------------------------------

@dataclass(frozen=True)
class ThreatModel:
    """Training facts granted to the attacker. `mode="auto"` infers FedSGD/FedAvg from each reply."""

    mode: str = "auto"
    batch_size: int | None = None
    local_steps: int | None = None
    lr: float | None = None
    input_shape: tuple[int, ...] | None = None    # None: taken from the audit record, else from the first layer
    num_classes: int | None = None                # None: the output size of the model's last Linear layer
    normalization: Normalization = Normalization()
    grant_labels: bool = False


# --- records ---------------------------------------------------------------------------------------------------

@dataclass
class AttackRecord:
    """One attack on one client's update in one round."""

    round: int
    client: int
    attack: str
    seconds: float
    reconstruction: Reconstruction | None
    scores: Any = None             # fedsim.metrics.Scores, when ground truth was available
    error: str | None = None       # the attack raised: its message


@dataclass(frozen=True)
class Fault:
    round: int
    client: int | None
    node_id: int
    kind: str                      # crash, dropout, nan, shape
    detail: str = ""


class Recorder(Protocol):
    def on_attack(self, record: AttackRecord, truth: GroundTruth | None, meta: TrainMeta) -> None: ...
    def on_fault(self, fault: Fault) -> None: ...
    def on_round(self, server_round: int, info: Mapping[str, Any]) -> None: ...


class MemoryRecorder:
    """Keeps records in lists (for tests and interactive use)."""

    def __init__(self) -> None:
        self.attacks: list[AttackRecord] = []
        self.faults: list[Fault] = []
        self.rounds: list[tuple[int, dict]] = []

    def on_attack(self, record: AttackRecord, truth: GroundTruth | None, meta: TrainMeta) -> None:
        self.attacks.append(record)

    def on_fault(self, fault: Fault) -> None:
        self.faults.append(fault)

    def on_round(self, server_round: int, info: Mapping[str, Any]) -> None:
        self.rounds.append((server_round, dict(info)))


Scorer = Callable[[Reconstruction, GroundTruth, TrainMeta], Any]


def make_scorer(recovered_ssim: float | None = None) -> Scorer:
    """The scorer: `fedsim.metrics.score` in pixel space, `recovered` at SSIM >= `recovered_ssim` (metrics'
    default when None). A reconstruction with `stats["failed"]` (the attack raised) scores as returning nothing."""
    from fedsim.metrics import RECOVERED_SSIM, score

    threshold = RECOVERED_SSIM if recovered_ssim is None else recovered_ssim

    def scorer(recon: Reconstruction, truth: GroundTruth, meta: TrainMeta) -> Any:
        norm = meta.normalization
        images = len(meta.input_shape) == 3
        recon_px = norm.to_pixels(recon.inputs.detach().float()) if recon.inputs is not None else None
        pool = norm.to_pixels(truth.partition.float()) if truth.partition is not None else None
        return score(recon_px, norm.to_pixels(truth.inputs), recon_labels=recon.labels, truth_labels=truth.labels,
                     images=images, partition_pixels=pool, recovered_ssim=threshold,
                     failed=bool(recon.stats.get("failed", False)))

    return scorer


default_scorer = make_scorer()


# --- the wrapper ---------------------------------------------------------------------------------------------

class CuriousStrategy(Strategy):
    """Wrap `strategy` so an honest-but-curious server attacks every (targeted) client update.

    strategy: any Message-API strategy; it aggregates exactly as it would unwrapped.
    attacks: attacks to run on each observation: `attacks.base.Attack` instances or registered names ("spear").
    model_fn: builds a fresh `nn.Module` with the architecture of the global model (weights are loaded from the
        ArrayRecord the server sends, by name).
    threat: what the server is assumed to know (`ThreatModel`).
    targets: "all", an int N (clients 0..N-1) or a list of client ids; sample: attack at most this many per round.
    recorder: receives attack records, faults and round summaries (default: kept in memory).
    drop_faulty: leave replies with NaN/Inf or wrong shapes out of aggregation (they would poison the model).
    client_of_node: node id -> client id when known (else taken from replies, or numbered in order of arrival).
    output: a directory for fedsim's result files (results.jsonl, rounds.jsonl, grids/, status.json), as a fedsim
        run writes them, so `fedsim-report` reads them; used when no `recorder` is given.
    view: the attacker's view of each observation under the defense (`Defense.observe`); identity by default.
    partitions: client id -> that client's whole training partition (model space; `AGGREGATE_CLIENT`: every
        contributing client's), for the scorer only (`identified`); never shown to an attack.

    Replies that carry `AGGREGATE_KEY` (secure aggregation) hold one aggregate, not individual updates: it is
    attacked once per round as client `AGGREGATE_CLIENT`, as a batch of all contributing clients' samples.
    """

    def __init__(self, strategy: Strategy, attacks: Sequence[Attack | str], model_fn: Callable[[], nn.Module],
                 threat: ThreatModel = ThreatModel(), *, targets: Any = "all", sample: int | None = None,
                 seed: int = 0, recorder: Recorder | None = None, scorer: Scorer = default_scorer,
                 drop_faulty: bool = True, min_clients: int = 1, arrayrecord_key: str | None = None,
                 client_of_node: Mapping[int, int] | None = None, output: str | None = None,
                 view: Callable[[Observation], Observation] | None = None,
                 partitions: Callable[[int], Tensor | None] | None = None) -> None:
        self.inner = strategy
        from attacks.base import build_attack

        self.attacks = [build_attack({"name": a}) if isinstance(a, str) else a for a in attacks]
        self.model_fn = model_fn
        self.threat = threat
        self.targets = targets
        self.sample = sample
        self.seed = seed
        self._writer = None
        if recorder is None and output is not None:
            from fedsim.results import ResultsWriter, RunRecorder

            self._writer = ResultsWriter(output)
            self._writer.start(f"# results of CuriousStrategy around {type(strategy).__name__}\n", 0)
            recorder = RunRecorder(self._writer, run_info={"seed": seed}, rounds=1, grid_clients=2)
        self.recorder = recorder if recorder is not None else MemoryRecorder()
        self.scorer = scorer
        self.drop_faulty = drop_faulty
        self.min_clients = min_clients
        self.arrayrecord_key = arrayrecord_key or getattr(strategy, "arrayrecord_key", "arrays")
        self._sent: dict[int, list[int]] = {}
        self._global: dict[int, dict[str, Tensor]] = {}
        self._client_ids: dict[int, int] = dict(client_of_node or {})  # node id -> client id
        self._param_names: list[str] | None = None
        self._buffers: frozenset[str] | None = None
        self.view = view
        self.partitions = partitions

    # -- delegation ---------------------------------------------------------------------------------------------
    def start(self, *args, **kwargs):
        """Run the strategy (Flower's `Strategy.start`); the result files are marked complete at the end."""
        try:
            result = super().start(*args, **kwargs)
        except BaseException as err:
            if self._writer is not None:
                self._writer.finish("failed", error=f"{type(err).__name__}: {err}")
            raise
        if self._writer is not None:
            self._writer.finish("complete")
        return result

    def summary(self) -> None:
        self.inner.summary()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        if metrics:  # clients' own evaluation (e.g. with their private key-lock layers), beside the server's
            self.recorder.on_round(server_round, {k: v for k, v in metrics.items()})
        return metrics

    # -- observe ------------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent[server_round] = [m.metadata.dst_node_id for m in messages]
        self._global[server_round] = {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        global_state = self._global.pop(server_round, None)
        sent = self._sent.pop(server_round, [])
        healthy = self._screen(server_round, replies, sent, global_state)
        truths = {id(r): _pop_audit(r) for r in replies if not r.has_error()}
        grants = {id(r): _pop_grant(r) for r in replies if not r.has_error()}
        aggregate = next((r for r in healthy if AGGREGATE_KEY in r.content.config_records), None)
        if global_state is not None and aggregate is not None:
            info = aggregate.content.config_records[AGGREGATE_KEY]
            truth = next((truths[id(r)] for r in healthy if truths.get(id(r)) is not None), None)
            self._observe(server_round, aggregate, global_state, truth, client=AGGREGATE_CLIENT,
                          batch_size=int(info["batch-size"]) if "batch-size" in info else None,
                          num_examples=int(info["num-examples"]) if "num-examples" in info else None)
        elif global_state is not None:
            chosen = self._choose(server_round, healthy)
            for reply in chosen:
                self._observe(server_round, reply, global_state, truths.get(id(reply)), grant=grants.get(id(reply)))
        healthy_ids = {id(r) for r in healthy}
        kept = [r for r in replies if id(r) in healthy_ids or r.has_error() or not self.drop_faulty]
        n_healthy = len(healthy)
        self.recorder.on_round(server_round, {"sent": len(sent), "received": len(replies), "healthy": n_healthy,
                                              "observed": "aggregate" if aggregate is not None else "individual"})
        if n_healthy < self.min_clients:
            self.recorder.on_round(server_round, {"skipped": f"{n_healthy} healthy replies < min_clients={self.min_clients}"})
            arrays, metrics = None, None
        else:
            arrays, metrics = self.inner.aggregate_train(server_round, kept)
        if self._writer is not None:  # no fedsim server evaluation closes the round: close it here
            self.recorder.on_evaluate(server_round, dict(metrics or {}))
        return arrays, metrics

    def _screen(self, server_round: int, replies: list[Message], sent: list[int],
                global_state: Mapping[str, Tensor] | None) -> list[Message]:
        """Detect faults (missing, error, non-finite, wrong shape); returns the healthy replies."""
        received = {r.metadata.src_node_id for r in replies}
        for node in sent:
            if node not in received:
                self.recorder.on_fault(Fault(server_round, self._known_client(node), node, "dropout",
                                             "no reply before the round's timeout"))
        healthy = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.recorder.on_fault(Fault(server_round, self._known_client(node), node, "crash",
                                             f"error code {reply.error.code}: {reply.error.reason[:300]}"))
                continue
            client = self._client_of(reply)
            problem = _check_arrays(reply, self.arrayrecord_key, global_state, self._buffer_names())
            if problem is not None:
                kind, detail = problem
                self.recorder.on_fault(Fault(server_round, client, node, kind, detail))
                continue
            healthy.append(reply)
        return healthy

    def _choose(self, server_round: int, healthy: list[Message]) -> list[Message]:
        chosen = [r for r in healthy if _targeted(self._client_of(r), self.targets)]
        chosen.sort(key=self._client_of)
        if self.sample is not None and len(chosen) > self.sample:
            rng = np.random.default_rng([self.seed, server_round, 0x5A])
            keep = sorted(rng.choice(len(chosen), self.sample, replace=False).tolist())
            chosen = [chosen[i] for i in keep]
        return chosen

    def _observe(self, server_round: int, reply: Message, global_state: Mapping[str, Tensor],
                 truth: GroundTruth | None, *, client: int | None = None, batch_size: int | None = None,
                 num_examples: int | None = None, grant: Mapping[str, Any] | None = None) -> None:
        client = self._client_of(reply) if client is None else client
        if truth is not None and self.partitions is not None:
            truth = replace(truth, partition=self.partitions(client))
        model = self.model_fn()
        global_state = named_state(global_state, model)
        model.load_state_dict(global_state)
        model.eval()
        params = {name for name, _ in model.named_parameters()}
        received = {k: torch.from_numpy(v.numpy().copy()) for k, v in reply.content[self.arrayrecord_key].items()}
        state = named_state(received, model)
        sent = set(named_state(received, model, fill=False))
        mode = self._mode(state, global_state, params)
        if mode == "fedsgd":
            update = {k: v for k, v in state.items() if k in params}
        else:
            update = {k: state[k] - global_state[k] for k in state if k in params}
        buffers = {k: v for k, v in state.items() if k not in params and k in sent}  # all the client sent
        meta = self._meta(mode, reply, model, truth, batch_size=batch_size, num_examples=num_examples)
        if grant:
            meta = replace(meta, private={**meta.private, **grant})
        for attack in self.attacks:
            obs = Observation(server_round, client, copy.deepcopy(model), update, meta, buffers)
            if self.view is not None:
                obs = self.view(obs)
            start = time.perf_counter()
            recon, error = None, None
            try:
                recon = attack.reconstruct(obs)
            except Exception as err:  # an attack failing on one update must not stop the federation
                error = f"{type(err).__name__}: {err}"
                log.warning("attack %s failed on client %s round %s: %s", attack.name, client, server_round, error)
            seconds = time.perf_counter() - start
            scores = None
            if truth is not None:  # an attack that raised recovered nothing: scored so, not left out
                scored = recon if recon is not None else Reconstruction(inputs=None, stats={"failed": True})
                scores = self.scorer(scored, truth, meta)
            self.recorder.on_attack(AttackRecord(server_round, client, attack.name, seconds, recon, scores, error),
                                    truth, meta)

    def _mode(self, state: Mapping[str, Tensor], global_state: Mapping[str, Tensor], params: set[str]) -> str:
        """FedSGD replies carry gradients, FedAvg replies carry weights close to the global model."""
        if self.threat.mode != "auto":
            return self.threat.mode
        diff = sum(float((state[k].double() - global_state[k].double()).norm() ** 2) for k in params if k in state)
        ref = sum(float(global_state[k].double().norm() ** 2) for k in params if k in global_state)
        return "fedavg" if math.sqrt(diff) < 0.5 * math.sqrt(ref) else "fedsgd"

    def _meta(self, mode: str, reply: Message, model: nn.Module, truth: GroundTruth | None,
              batch_size: int | None = None, num_examples: int | None = None) -> TrainMeta:
        t = self.threat
        input_shape = t.input_shape or (tuple(truth.inputs.shape[1:]) if truth is not None else _infer_input(model))
        for record in reply.content.metric_records.values():
            if "num-examples" in record and num_examples is None:
                num_examples = int(record["num-examples"])
        labels = truth.labels.clone() if (t.grant_labels and truth is not None) else None
        return TrainMeta(mode=mode, input_shape=input_shape, num_classes=t.num_classes or _infer_classes(model),
                         normalization=t.normalization,
                         batch_size=batch_size if (batch_size is not None and t.batch_size) else t.batch_size,
                         local_steps=1 if mode == "fedsgd" else t.local_steps, lr=t.lr, num_examples=num_examples,
                         labels=labels)

    # -- client identity ----------------------------------------------------------------------------------------
    def _client_of(self, reply: Message) -> int:
        record = reply.content.config_records.get(CLIENT_KEY) if reply.has_content() else None
        if record is not None and "partition-id" in record:
            client = int(record["partition-id"])
            self._client_ids[reply.metadata.src_node_id] = client
            return client
        node = reply.metadata.src_node_id
        if node not in self._client_ids:
            self._client_ids[node] = len(self._client_ids)
        return self._client_ids[node]

    def _known_client(self, node: int) -> int | None:
        return self._client_ids.get(node)

    def _buffer_names(self) -> frozenset[str]:
        """State-dict entries of the model that are not parameters (a client may keep them: fl.send_buffers)."""
        if self._buffers is None:
            model = self.model_fn()
            self._buffers = frozenset(model.state_dict()) - {n for n, _ in model.named_parameters()}
        return self._buffers


def named_state(arrays: Mapping[str, Tensor], model: nn.Module, *, fill: bool = True) -> dict[str, Tensor]:
    """Arrays keyed by the model's state_dict names.

    Flower apps often send `ArrayRecord(list_of_ndarrays)` (keys "0", "1", ...): then the arrays are matched to
    `model.state_dict()` (or, if fewer, to its parameters) in order, and their shapes must agree. Buffers the
    client did not send (`fl.send_buffers=false`) are taken from `model` when `fill`, else left out.
    """
    reference = model.state_dict()
    if set(reference) <= set(arrays):
        return {k: arrays[k] for k in reference}
    params = {n for n, _ in model.named_parameters()}
    if params <= set(arrays) and set(arrays) <= set(reference):  # by name, some buffers withheld
        return {k: arrays[k] if k in arrays else v for k, v in reference.items() if fill or k in arrays}
    values = list(arrays.values())
    for names in (list(reference), [n for n, _ in model.named_parameters()]):
        if len(names) == len(values) and all(tuple(v.shape) == tuple(reference[n].shape) for n, v in zip(names, values)):
            state = dict(zip(names, values))
            return {**{k: v for k, v in reference.items() if k not in state and fill}, **state}
    raise ValueError(f"the ArrayRecord's {len(values)} arrays match neither the names nor the order of the model's "
                     f"state_dict ({len(reference)} entries): check model_fn builds the app's model")


def _pop_audit(reply: Message) -> GroundTruth | None:
    record = reply.content.pop(AUDIT_KEY, None) if reply.has_content() else None
    return read_audit(record) if record is not None else None


def _pop_grant(reply: Message) -> dict[str, Any] | None:
    record = reply.content.pop(GRANT_KEY, None) if reply.has_content() else None
    return dict(record) if record is not None else None


def _targeted(client: int, targets: Any) -> bool:
    if targets == "all":
        return True
    if isinstance(targets, int):
        return client < targets
    return client in set(targets)


def _check_arrays(reply: Message, key: str, global_state: Mapping[str, Tensor] | None,
                  optional: frozenset[str] = frozenset()) -> tuple[str, str] | None:
    """('nan' | 'shape', detail) when the reply's arrays are unusable, else None. Names in `optional` (buffers a
    client may keep to itself) may be missing."""
    arrays = reply.content.array_records.get(key)
    if arrays is None:
        return "shape", f"no ArrayRecord '{key}' in the reply"
    for name, array in arrays.items():
        nd = to_numpy(array)
        if global_state is not None:
            expected = global_state.get(name)
            if expected is None:
                return "shape", f"unexpected array '{name}'"
            if tuple(nd.shape) != tuple(expected.shape):
                return "shape", f"'{name}' has shape {tuple(nd.shape)}, expected {tuple(expected.shape)}"
        if np.issubdtype(nd.dtype, np.floating) and not np.isfinite(nd).all():
            return "nan", f"'{name}' holds {int((~np.isfinite(nd)).sum())} non-finite values"
    if global_state is not None and len(arrays) != len(global_state):
        missing = sorted(set(global_state) - set(arrays.keys()) - optional)
        if missing:
            return "shape", f"missing arrays {missing[:3]}"
    return None


def _infer_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("cannot infer the number of classes: give ThreatModel(num_classes=...)")
    return last[-1].out_features


def _infer_input(model: nn.Module) -> tuple[int, ...]:
    from fedsim.models.inspect import first_layer

    layer = first_layer(model).module
    if isinstance(layer, nn.Linear):
        return (layer.in_features,)
    raise ValueError("cannot infer the input shape: give ThreatModel(input_shape=...)")
