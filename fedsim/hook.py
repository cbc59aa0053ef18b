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
import dataclasses
import fnmatch
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor, nn

from fedsim.attacks.base import Attack, build_attack
from fedsim.arrays import records
from fedsim.ceiling import layer_ceiling
from fedsim.errors import ConfigError
from fedsim.grids import is_late
from fedsim.metrics import RECOVERED_SSIM, score
from fedsim.models.inspect import first_layer
from fedsim.protocol import (  # noqa: F401  (audit_record: re-exported)
    AGGREGATE_CLIENT,
    AGGREGATE_KEY,
    AUDIT_KEY,
    CLIENT_KEY,
    GRANT_KEY,
    AuditFailed,
    GroundTruth,
    audit_record,
    read_audit,
)
from fedsim.results import ResultsWriter, RunRecorder
from fedsim.schedule import AttackSchedule
from fedsim.screen import MAX_RATIO, check_audit, decode, screen
from fedsim.seeds import SAMPLE_TARGETS_STREAM, round_rng
from fedsim.threat import Normalization, Observation, Optimizer, Reconstruction, TrainMeta, implausible_normalization

log = logging.getLogger("fedsim")

# --- what the server is assumed to know ----------------------------------------------------------------------

@dataclass(frozen=True)
class ThreatModel:
    """What the server is assumed to know about the clients' training, in the app's own terms. `None`: not known.

    mode: "fedavg" (clients reply with weights), "fedsgd" (with gradients) or "auto" (inferred from each reply).
    batch_size: samples per local step (the app's DataLoader batch_size).
    local_epochs or local_steps (not both): passes over the client's data per round, or optimizer steps per round.
        With epochs, each client's steps are epochs x ceil(num-examples / batch_size), from the num-examples it
        reports, and the update mixes num-examples distinct samples (2 epochs of 4 batches of 8: 8 steps, 32).
    lr, optimizer ("sgd", "adam", "adamw", "other"), momentum, weight_decay: the client's local optimizer.
    lr_key: the key of the train ConfigRecord that carries the clients' learning rate, when the server sends it
        (a schedule): each round's value, as sent, replaces `lr`.
    input_shape: one sample (None: from the audit record, else from the first layer).
    num_classes: None: the output size of the model's last Linear layer.
    normalization: the app's input normalisation (torchvision `Normalize(mean, std)` -> `Normalization(mean, std)`);
        the hook warns when the data contradict it.
    personal_layers: glob patterns of parameters the clients keep for themselves (a personalised head, "fc3.*"):
        left out of every update the attacks see.
    grant_labels: the attacker knows the true labels. BatchNorm statistics a client sends are always observed.
    """

    mode: str = "auto"
    batch_size: int | None = None
    local_steps: int | None = None
    lr: float | None = None
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    normalization: Normalization = Normalization()
    grant_labels: bool = False
    local_epochs: int | None = None
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    personal_layers: tuple[str, ...] = ()
    lr_key: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "fedavg", "fedsgd"):
            raise ConfigError("mode", self.mode, "auto, fedavg or fedsgd")
        if self.local_steps is not None and self.local_epochs is not None:
            raise ConfigError("local_epochs", self.local_epochs, "None when local_steps is given (one or the other)")
        for key in ("batch_size", "local_steps", "local_epochs"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(key, value, "a positive integer or None")
        if not isinstance(self.normalization, Normalization):
            raise ConfigError("normalization", self.normalization, "fedsim.Normalization(mean, std)")
        if isinstance(self.personal_layers, str):
            object.__setattr__(self, "personal_layers", (self.personal_layers,))
        Optimizer(self.optimizer, self.momentum, self.weight_decay)  # checks the three

    def training(self, mode: str, batch_size: int | None, num_examples: int | None) -> tuple[int | None, int | None]:
        """(optimizer steps, distinct samples) of one client's update in `mode`, as far as this threat model tells.

        FedSGD: one step on one batch. FedAvg with epochs: every example each epoch, ceil(n / batch_size) steps per
        epoch. FedAvg with steps: the client cycles through its data, touching min(n, steps x batch_size) samples.
        """
        n = num_examples
        if mode == "fedsgd":
            return 1, (min(batch_size, n) if batch_size and n else batch_size)
        if self.local_epochs is not None:
            steps = self.local_epochs * math.ceil(n / batch_size) if n and batch_size else None
            return steps, n
        if self.local_steps is not None:
            touched = self.local_steps * batch_size if batch_size else None
            return self.local_steps, (min(n, touched) if n and touched else touched)
        return None, None

    def personal(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.personal_layers)

    def meta(self, mode: str, input_shape: tuple[int, ...], num_classes: int, *, batch_size: int | None = None,
             num_examples: int | None = None, labels: Tensor | None = None, lr: float | None = None) -> TrainMeta:
        """The training facts this threat model grants the attacker of one update in `mode` (the one place that
        turns a threat model into a `TrainMeta`). batch_size: the batch the reply states (used only when the batch
        size is granted); lr: this round's learning rate, as sent (else the threat model's)."""
        batch_size = batch_size if (batch_size is not None and self.batch_size) else self.batch_size
        steps, distinct = self.training(mode, batch_size, num_examples)
        return TrainMeta(mode=mode, input_shape=tuple(input_shape), num_classes=num_classes,
                         normalization=self.normalization, batch_size=batch_size, local_steps=steps,
                         lr=lr if lr is not None else self.lr, num_examples=num_examples, labels=labels,
                         local_epochs=self.local_epochs if mode == "fedavg" else None, distinct_samples=distinct,
                         optimizer=Optimizer(self.optimizer, self.momentum, self.weight_decay))


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
    ceiling: Any = None            # Scores of the update's least-squares ceiling (`fedsim.ceiling`), where it applies


@dataclass(frozen=True)
class Fault:
    round: int
    client: int | None
    node_id: int
    kind: str                      # see FAULT_KINDS
    detail: str = ""


# What a Fault's kind says: crash (the client raised), dropout (no reply), timeout (no reply within the round's
# timeout), decode / dtype / shape / nan / huge / examples / metrics / audit / client (`fedsim.screen`), impersonate (a
# reply claiming another node's partition), observe / score (the server's processing of that one reply raised),
# aggregate (client None: the round's new global model was not finite, or the aggregation raised; the previous
# model is kept).
FAULT_KINDS = ("crash", "dropout", "timeout", "decode", "dtype", "shape", "nan", "huge", "examples", "metrics",
               "audit", "client", "impersonate", "observe", "score", "aggregate")


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

    strategy: any Message-API strategy, including subclasses with their own methods, state and `start()`; it
        aggregates exactly as it would unwrapped. Attributes the wrapper does not have are the strategy's
        (read and written through), and `start()` runs the strategy's own `start()`, with the hook on the
        `configure_train`, `aggregate_train` and `aggregate_evaluate` that it calls.
    attacks: attacks to run on each observation: registered names ("spear"), mappings of a name and its knobs as
        in the CLI's YAML (`{"name": "inverting", "iterations": 200}`), paths of such YAML files, or
        `fedsim.attacks.base.Attack` instances.
    model_fn: builds a fresh `nn.Module` with the architecture of the global model (weights are loaded from the
        ArrayRecord the server sends, by name).
    threat: what the server is assumed to know (`ThreatModel`).
    targets: "all", an int N (clients 0..N-1) or a list of client ids; sample: attack at most this many per round.
    rounds: the rounds attacked (`fedsim.schedule`): "all", "first", "middle", "last", a list such as
        ["first", "last"] or [1, 10], or {"every": k}. Names resolve against `start()`'s num_rounds. Rounds not
        attacked still train, are screened and aggregated; their line in rounds.jsonl says `attacked: false`.
    recorder: receives attack records, faults and round summaries (default: kept in memory).
    drop_faulty: leave replies with NaN/Inf or wrong shapes out of aggregation (they would poison the model).
    client_of_node: node id -> client id when known (else taken from replies, or numbered in order of arrival).
    output: a directory for fedsim's result files, as a fedsim run writes them (config.yaml with the threat model
        and the attacks' knobs, status.json, results.jsonl, rounds.jsonl with the app's own metrics, grids/ of the
        first and last round), so `fedsim-report` reads them; used when no `recorder` is given.
    view: the attacker's view of each observation under the defense (`Defense.observe`); identity by default.
    partitions: client id -> that client's whole training partition (model space; `AGGREGATE_CLIENT`: every
        contributing client's), for the scorer only (`identified`); never shown to an attack.
    max_ratio: a reply whose norm (or example count) exceeds this many times the round's median is rejected.
    check_aggregate: further check of each new global model (e.g. its loss is finite): a message rejects it.

    Every reply is screened completely (`fedsim.screen`) before anything uses it; a failed check, a reply that
    claims another node's partition, or an exception while processing one reply is a `Fault` of that client and
    the reply is left out; the round goes on. A new global model that is not finite is rejected (the previous
    one is kept) and recorded as an `aggregate` fault.

    Replies that carry `AGGREGATE_KEY` (secure aggregation) hold one aggregate, not individual updates: it is
    attacked once per round as client `AGGREGATE_CLIENT`, as a batch of all contributing clients' samples.
    """

    _HOOKED = ("configure_train", "aggregate_train", "aggregate_evaluate")  # what the strategy's start() calls

    def __init__(self, strategy: Strategy, attacks: Sequence[Attack | str | Mapping[str, Any]],
                 model_fn: Callable[[], nn.Module], threat: ThreatModel = ThreatModel(), *, targets: Any = "all",
                 sample: int | None = None, seed: int = 0, recorder: Recorder | None = None,
                 scorer: Scorer = default_scorer, drop_faulty: bool = True, min_clients: int = 1,
                 arrayrecord_key: str | None = None, client_of_node: Mapping[int, int] | None = None,
                 output: str | None = None, view: Callable[[Observation], Observation] | None = None,
                 partitions: Callable[[int], Tensor | None] | None = None, max_ratio: float = MAX_RATIO,
                 check_aggregate: Callable[[int, ArrayRecord], str | None] | None = None,
                 rounds: Any = "all") -> None:
        self.inner = strategy
        self.schedule = AttackSchedule.parse(rounds, "rounds")
        self._num_rounds: int | None = None
        self.attacks = build_attacks(attacks)
        self.model_fn = model_fn
        self.threat = threat
        self.targets = targets
        self.sample = sample
        self.seed = seed
        self._writer = None
        if recorder is None and output is not None:
            self._writer = ResultsWriter(output)
            recorder = RunRecorder(self._writer, run_info={"seed": seed}, rounds=1, grid_clients=2)
        self.recorder = recorder if recorder is not None else MemoryRecorder()
        self.scorer = scorer
        self.drop_faulty = drop_faulty
        self.min_clients = min_clients
        self.arrayrecord_key = arrayrecord_key or getattr(strategy, "arrayrecord_key", "arrays")
        self._sent: dict[int, list[int]] = {}
        self._global: dict[int, dict[str, Tensor]] = {}
        self._lr: dict[int, float] = {}        # the learning rate each round's instructions carried (threat.lr_key)
        self._client_ids: dict[int, int] = dict(client_of_node or {})  # node id -> client id
        self._param_names: list[str] | None = None
        self._buffers: frozenset[str] | None = None
        self.view = view
        self.max_ratio = max_ratio
        self._model_dtypes: dict[str, torch.dtype] | None = None
        self.check_aggregate = check_aggregate
        self.rounds_trained: list[int] = []      # rounds whose aggregate became the global model
        self.rounds_rejected: list[int] = []     # rounds whose aggregate was refused (not finite)
        self.partitions = partitions
        self.warnings: list[str] = []          # said once per run (also in status.json when writing output)
        self._originals: dict[str, Callable] = {}  # the strategy's own hooked methods while its start() runs
        self._started = False                  # the output directory is set up
        self._open_round: int | None = None    # a round whose line in rounds.jsonl awaits the app's evaluation
        self._rounds_run = 0
        self._rounds_trained = 0               # rounds whose aggregation produced a model
        self._skips: list[str] = []
        self._normalization_checked = False
        self._ready = True                     # from here on, unknown attributes are the wrapped strategy's

    # -- transparency: the wrapped strategy's attributes, methods and start() --------------------------------------
    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return getattr(inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_ready") and name not in self.__dict__ and not hasattr(type(self), name):
            setattr(self.inner, name, value)  # the strategy's own state, where its methods read it
        else:
            object.__setattr__(self, name, value)

    def _inner(self, name: str) -> Callable:
        return self._originals.get(name) or getattr(self.inner, name)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None, **kwargs: Any):
        """Run the wrapped strategy's `start()` (its own, or Flower's) with the hook on the methods it calls.

        With `output`, the result files are set up first and marked complete at the end, or failed when the
        strategy raised or no round produced a model (every aggregation skipped: the model is untrained).
        """
        self.schedule = AttackSchedule.parse(self.schedule.spec, "rounds", num_rounds)  # round numbers exist
        self._num_rounds = num_rounds
        self._begin(num_rounds)
        inner = self.inner
        saved = {name: inner.__dict__[name] for name in self._HOOKED if name in inner.__dict__}
        self._originals = {name: getattr(inner, name) for name in self._HOOKED}
        for name in self._HOOKED:  # an instance attribute wins over the class's method: start() calls the hook
            inner.__dict__[name] = getattr(self, name)
        try:
            result = inner.start(grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                                 train_config=train_config, evaluate_config=evaluate_config,
                                 evaluate_fn=self._evaluating(evaluate_fn), **kwargs)
        except BaseException as err:
            self._end("failed", f"{type(err).__name__}: {err}")
            raise
        finally:
            for name in self._HOOKED:
                inner.__dict__.pop(name, None)
            inner.__dict__.update(saved)
            self._originals = {}
        self._end("complete")
        return result

    def summary(self) -> None:
        self.inner.summary()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        try:
            metrics = self._inner("aggregate_evaluate")(server_round, replies)
        except Exception as err:  # clients' own evaluation is a side show: a bad reply must not end the run
            log.warning("round %s: aggregating the clients' evaluation failed: %s: %s", server_round,
                        type(err).__name__, err)
            return None
        if metrics:  # clients' own evaluation (e.g. with their private key-lock layers), beside the server's
            self.recorder.on_round(server_round, {k: v for k, v in metrics.items()})
        return metrics

    # -- observe ------------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._begin(None)
        if self._open_round is not None:  # the app evaluates nothing on the server: the last round closes here
            self._close_round(self._open_round, {})
        messages = list(self._inner("configure_train")(server_round, arrays, config, grid))
        self._sent[server_round] = [m.metadata.dst_node_id for m in messages]
        self._global[server_round] = {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}
        if self.threat.lr_key is not None:
            sent_lr = next((record[self.threat.lr_key] for m in messages for record in m.content.config_records.values()
                            if self.threat.lr_key in record), None)
            if sent_lr is not None:
                self._lr[server_round] = float(sent_lr)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        global_state = self._global.pop(server_round, None)
        sent = self._sent.pop(server_round, [])
        audits = {id(r): _pop_audit(r) for r in replies if not r.has_error()}
        for reply in replies:  # the audit mod names its client (simulation only)
            partition = audits.get(id(reply), (None, None, None))[2]
            if partition is not None:
                self._client_ids.setdefault(reply.metadata.src_node_id, partition)
        healthy = self._screen(server_round, replies, sent, global_state)
        truths = {}
        for reply in list(healthy):
            truth, failure, _, malformed = audits.get(id(reply), (None, None, None, False))
            truths[id(reply)] = truth
            if malformed:  # a malformed audit record is a hostile or broken reply: left out
                self.recorder.on_fault(Fault(server_round, self._client_of(reply), reply.metadata.src_node_id,
                                             "audit", failure))
                healthy.remove(reply)
            elif failure is not None:  # the client could not capture its batch: it still aggregates, unscored
                self.recorder.on_fault(Fault(server_round, self._client_of(reply), reply.metadata.src_node_id,
                                             "audit", f"no ground truth, the attacks go unscored: {failure}"))
        grants = {id(r): _pop_grant(r) for r in replies if r.has_content()}
        aggregate = next((r for r in healthy if isinstance(r.content.get(AGGREGATE_KEY), ConfigRecord)), None)
        failed: set[int] = set()
        attacked = self.schedule.attacks(server_round, self._num_rounds)
        if not attacked:
            pass  # a round the schedule leaves alone: screened and aggregated, not attacked
        elif global_state is not None and aggregate is not None:
            info = aggregate.content.config_records[AGGREGATE_KEY]
            truth = next((truths[id(r)] for r in healthy if truths.get(id(r)) is not None), None)
            self._guarded(server_round, aggregate, failed, self._observe, server_round, aggregate, global_state,
                          truth, client=AGGREGATE_CLIENT, batch_size=_int_or_none(info.get("batch-size")),
                          num_examples=_int_or_none(info.get("num-examples")))
        elif global_state is not None:
            for reply in self._choose(server_round, healthy):
                self._guarded(server_round, reply, failed, self._observe, server_round, reply, global_state,
                              truths.get(id(reply)), grant=grants.get(id(reply)))
        healthy = [r for r in healthy if id(r) not in failed]
        healthy_ids = {id(r) for r in healthy}
        kept = [r for r in replies if id(r) in healthy_ids or r.has_error() or not self.drop_faulty]
        n_healthy = len(healthy)
        self.recorder.on_round(server_round, {"sent": len(sent), "received": len(replies), "healthy": n_healthy,
                                              "observed": "aggregate" if aggregate is not None else "individual",
                                              "attacked": attacked})
        arrays, metrics = None, None
        if n_healthy < self.min_clients:
            skipped = f"{n_healthy} healthy replies < min_clients={self.min_clients}"
            self.recorder.on_round(server_round, {"skipped": skipped})
        else:
            skipped = "the strategy aggregated no model"
            try:
                arrays, metrics = self._inner("aggregate_train")(server_round, kept)
            except Exception as err:  # the previous model is kept; the run goes on
                skipped = f"aggregation raised {type(err).__name__}"
                self._reject(server_round, f"aggregation raised {type(err).__name__}: {str(err)[:300]}")
            if arrays is not None:
                problem = _check_global(arrays)
                if problem is None and self.check_aggregate is not None:
                    try:
                        problem = self.check_aggregate(server_round, arrays)
                    except Exception as err:
                        problem = f"checking the new global model raised {type(err).__name__}: {str(err)[:300]}"
                if problem is not None:
                    self._reject(server_round, problem)
                    skipped = f"the new global model was rejected ({problem})"
                    arrays, metrics = None, None
                else:
                    self.rounds_trained.append(server_round)
        self._rounds_run += 1
        if arrays is not None:
            self._rounds_trained += 1
        else:
            self._skips.append(f"round {server_round}: {skipped}")
        if self._writer is not None:  # the round's line waits for the app's evaluation, if it has one
            self.recorder.on_round(server_round, {k if k.startswith("train") else f"train_{k}": v
                                                  for k, v in (metrics or {}).items()})
            self._open_round = server_round
        return arrays, metrics

    def _reject(self, server_round: int, detail: str) -> None:
        log.warning("round %s: the new global model is rejected, the previous one kept: %s", server_round, detail)
        self.rounds_rejected.append(server_round)
        self.recorder.on_fault(Fault(server_round, None, 0, "aggregate", detail))
        self.recorder.on_round(server_round, {"rejected": detail})

    def _guarded(self, server_round: int, reply: Message, failed: set[int], stage: Callable, *args, **kwargs):
        """Run one client's processing stage; an exception is that client's `observe` fault, not the end of the
        run, and its reply is left out."""
        try:
            return stage(*args, **kwargs)
        except Exception as err:
            detail = f"{type(err).__name__}: {str(err)[:300]}"
            log.warning("round %s: processing the reply of node %s failed (%s)", server_round,
                        reply.metadata.src_node_id, detail)
            self.recorder.on_fault(Fault(server_round, self._known_client(reply.metadata.src_node_id),
                                         reply.metadata.src_node_id, "observe", detail))
            failed.add(id(reply))
            return None

    # -- the run directory (output=...) ---------------------------------------------------------------------------
    def _begin(self, num_rounds: int | None) -> None:
        """Set up the output directory once: config.yaml, status.json with the rounds to come."""
        if self._writer is None or self._started:
            return
        self._started = True
        self._writer.start(self._config_yaml(num_rounds), int(num_rounds or 0))
        if num_rounds:
            self.recorder.rounds = int(num_rounds)  # grids of the first and the last attacked round
            chosen = self.schedule.resolve(int(num_rounds))
            if chosen and hasattr(self.recorder, "grid_rounds"):
                self.recorder.grid_rounds = (min(chosen), max(chosen))

    def _config_yaml(self, num_rounds: int | None) -> str:
        threat = dataclasses.asdict(self.threat)
        threat["normalization"] = {"mean": list(self.threat.normalization.mean),
                                   "std": list(self.threat.normalization.std)}
        config = {
            "strategy": type(self.inner).__name__, "rounds": num_rounds, "seed": self.seed,
            "attacks": [{"name": a.name, **(dataclasses.asdict(a.config) if dataclasses.is_dataclass(a.config)
                                            else {})} for a in self.attacks],
            "threat": threat, "targets": self.targets, "sample": self.sample, "rounds": self.schedule.spec,
            "min_clients": self.min_clients}
        header = f"# fedsim CuriousStrategy around {type(self.inner).__name__}: the resolved threat model and attacks\n"
        return header + yaml.safe_dump(_plain_yaml(config), sort_keys=False)

    def _evaluating(self, evaluate_fn: Callable | None) -> Callable | None:
        """The app's server-side evaluation, its metrics recorded in the round's line of rounds.jsonl."""
        if evaluate_fn is None or self._writer is None:
            return evaluate_fn

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            metrics = evaluate_fn(server_round, arrays)
            self._close_round(server_round, dict(metrics or {}))
            return metrics

        return evaluate

    def _close_round(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        if self._writer is not None:
            self.recorder.on_evaluate(server_round, dict(metrics))
        if server_round == self._open_round:
            self._open_round = None

    def _end(self, state: str, error: str | None = None) -> None:
        if self._rounds_run and not self._rounds_trained:
            reason = (f"no round produced a model: all {self._rounds_run} aggregations were skipped, the model is "
                      f"untrained ({'; '.join(self._skips[:3])})")
            log.error("fedsim CuriousStrategy: %s", reason)
            if state == "complete":
                state, error = "failed", reason
        if self._writer is None:
            return
        if self._open_round is not None:
            self._close_round(self._open_round, {})
        self._begin(None)
        self._writer.update_status(rounds_trained=self._rounds_trained, warnings=list(self.warnings))
        self._writer.finish(state, error=error)

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            log.warning("fedsim CuriousStrategy: %s", message)

    def _screen(self, server_round: int, replies: list[Message], sent: list[int],
                global_state: Mapping[str, Tensor] | None) -> list[Message]:
        """Detect faults (missing, late, error, impersonation, anything `fedsim.screen` finds); returns the
        healthy replies."""
        received = {r.metadata.src_node_id for r in replies}
        for node in sent:
            if node not in received:
                self.recorder.on_fault(Fault(server_round, self._known_client(node), node, "dropout",
                                             "no reply before the round's timeout"))
        candidates = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                kind = "timeout" if is_late(reply) else "crash"
                self.recorder.on_fault(Fault(server_round, self._known_client(node), node, kind,
                                             f"error code {reply.error.code}: {reply.error.reason[:300]}"))
                continue
            client, claim = self._identify(reply)
            if claim is not None:
                self.recorder.on_fault(Fault(server_round, client, node, "impersonate", claim))
                continue
            candidates.append(reply)
        problems = screen([r.content for r in candidates], self._reference(global_state),
                          arrayrecord_key=self.arrayrecord_key,
                          weight_key=getattr(self.inner, "weighted_by_key", "num-examples"), audit_key=AUDIT_KEY,
                          client_key=CLIENT_KEY, max_ratio=self.max_ratio, optional=self._buffer_names(),
                          scale=_model_norm(global_state) if global_state is not None else 0.0)
        healthy = []
        for reply, problem in zip(candidates, problems):
            if problem is not None:
                node = reply.metadata.src_node_id
                self.recorder.on_fault(Fault(server_round, self._client_of(reply), node, problem.kind,
                                             problem.detail))
                continue
            healthy.append(reply)
        return healthy

    def _reference(self, global_state: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
        """What each reply must match: the shapes of the arrays sent, in the dtypes of the model itself (a
        strategy's average may have turned an integer buffer into floats; a client's reply must not)."""
        if global_state is None:
            return None
        if self._model_dtypes is None:
            self._model_dtypes = {k: v.dtype for k, v in self.model_fn().state_dict().items()}
        return {k: torch.empty(v.shape, dtype=self._model_dtypes.get(k, v.dtype), device="meta")
                for k, v in global_state.items()}

    def _choose(self, server_round: int, healthy: list[Message]) -> list[Message]:
        chosen = [r for r in healthy if _targeted(self._client_of(r), self.targets)]
        chosen.sort(key=self._client_of)
        if self.sample is not None and len(chosen) > self.sample:
            rng = round_rng(self.seed, server_round, SAMPLE_TARGETS_STREAM)
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
        params = {name for name, _ in model.named_parameters() if not self.threat.personal(name)}
        received = {k: torch.from_numpy(v.numpy().copy()) for k, v in reply.content[self.arrayrecord_key].items()}
        state = named_state(received, model)
        sent = set(named_state(received, model, fill=False))
        mode = self._mode(state, global_state, params)
        if mode == "fedsgd":
            update = {k: v for k, v in state.items() if k in params}
        else:
            update = {k: state[k] - global_state[k] for k in state if k in params}
        buffers = {k: v for k, v in state.items() if k not in params and k in sent}  # all the client sent
        meta = self._meta(mode, reply, model, truth, batch_size=batch_size, num_examples=num_examples,
                          server_round=server_round)
        if grant:
            meta = replace(meta, private={**meta.private, **grant})
        ceiling = None
        if truth is not None:
            self._check_normalization(truth.inputs, meta, "the audited batch")
            ceiling = self._ceiling(server_round, client, model, update, truth, meta)
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
            if recon is not None and recon.certified and recon.inputs is not None:
                self._check_normalization(recon.inputs, meta, f"{attack.name}'s certified reconstruction")
            if truth is not None:  # an attack that raised recovered nothing: scored so, not left out
                scored = recon if recon is not None else Reconstruction(inputs=None, stats={"failed": True})
                try:
                    scores = self.scorer(scored, truth, meta)
                except Exception as err:  # e.g. a reconstruction of values no matching can handle
                    detail = f"scoring {attack.name} failed: {type(err).__name__}: {str(err)[:300]}"
                    error = error or detail
                    self.recorder.on_fault(Fault(server_round, client, reply.metadata.src_node_id, "score", detail))
            self.recorder.on_attack(AttackRecord(server_round, client, attack.name, seconds, recon, scores, error,
                                                 ceiling), truth, meta)

    def _ceiling(self, server_round: int, client: int, model: nn.Module, update: Mapping[str, Tensor],
                 truth: GroundTruth, meta: TrainMeta) -> Any:
        """Scores of what the update leaves to an attacker with every sample's output gradient (`fedsim.ceiling`),
        once per observation; None where it does not apply. A failure leaves the records' ceiling empty and is
        logged; it is no fault of the client's (a scorer that raises is recorded once, for the attacks)."""
        try:
            estimate = layer_ceiling(model, update, truth, meta)
            # psnr, ssim and exact are recorded: no identification against the client's partition
            return None if estimate is None else self.scorer(Reconstruction(inputs=estimate),
                                                             replace(truth, partition=None), meta)
        except Exception as err:  # noqa: BLE001 - the ceiling is a reference, the attacks still run and score
            log.warning("the least-squares ceiling failed on client %s round %s: %s: %s", client, server_round,
                        type(err).__name__, str(err)[:300])
            return None

    def _mode(self, state: Mapping[str, Tensor], global_state: Mapping[str, Tensor], params: set[str]) -> str:
        """FedSGD replies carry gradients, FedAvg replies carry weights close to the global model."""
        if self.threat.mode != "auto":
            return self.threat.mode
        diff = sum(float((state[k].double() - global_state[k].double()).norm() ** 2) for k in params if k in state)
        ref = sum(float(global_state[k].double().norm() ** 2) for k in params if k in global_state)
        return "fedavg" if math.sqrt(diff) < 0.5 * math.sqrt(ref) else "fedsgd"

    def _meta(self, mode: str, reply: Message, model: nn.Module, truth: GroundTruth | None,
              batch_size: int | None = None, num_examples: int | None = None, server_round: int = 0) -> TrainMeta:
        t = self.threat
        input_shape = t.input_shape or (tuple(truth.inputs.shape[1:]) if truth is not None else _infer_input(model))
        for record in records(reply.content, MetricRecord).values():
            if "num-examples" in record and num_examples is None:
                num_examples = int(record["num-examples"])
        labels = truth.labels.clone() if (t.grant_labels and truth is not None) else None
        return t.meta(mode, input_shape, t.num_classes or _infer_classes(model), batch_size=batch_size,
                      num_examples=num_examples, labels=labels, lr=self._lr.get(server_round))

    def _check_normalization(self, inputs: Tensor, meta: TrainMeta, source: str) -> None:
        """Warn once when images in model space contradict the threat model's normalisation (a wrong one makes
        every attack's pixels and scores wrong, silently)."""
        if self._normalization_checked or len(meta.input_shape) != 3:
            return
        self._normalization_checked = True
        problem = implausible_normalization(inputs.reshape(inputs.shape[0], *meta.input_shape), meta.normalization)
        if problem is not None:
            self._warn(f"ThreatModel.normalization does not fit {source}: {problem}")

    # -- client identity ----------------------------------------------------------------------------------------
    def _identify(self, reply: Message) -> tuple[int | None, str | None]:
        """(client id of the reply's node, why its claim is refused or None).

        A node's client id is fixed once: by `client_of_node` (the partitions nodes reported at discovery) or by
        its first reply's claim; a reply claiming another partition (or one already bound to another node) is an
        impersonation. Replies without a claim are numbered in order of arrival.
        """
        node = reply.metadata.src_node_id
        record = records(reply.content, ConfigRecord).get(CLIENT_KEY) if reply.has_content() else None
        claim = record.get("partition-id") if record is not None else None
        known = self._client_ids.get(node)
        if claim is not None and (not isinstance(claim, int) or isinstance(claim, bool)):
            return known, f"malformed partition-id {claim!r}"
        if known is not None:
            if claim is not None and claim != known:
                return known, f"node {node} holds partition {known}, its reply claims partition {claim}"
            return known, None
        if claim is not None:
            if claim in self._client_ids.values():
                return None, f"node {node} claims partition {claim}, which another node holds"
            self._client_ids[node] = claim
            return claim, None
        taken = set(self._client_ids.values())
        self._client_ids[node] = next(i for i in range(len(taken) + 1) if i not in taken)
        return self._client_ids[node], None

    def _client_of(self, reply: Message) -> int:
        return self._identify(reply)[0]

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


def _pop_audit(reply: Message) -> tuple[GroundTruth | None, str | None, int | None, bool]:
    """Strip the audit record (from every reply: it never reaches aggregation): (ground truth, why there is none,
    the client's partition id, whether the record is malformed), each when known. A capture failure the client
    reports is not malformed (the reply aggregates, unscored); a record that does not read is (the reply is out)."""
    record = reply.content.pop(AUDIT_KEY, None) if reply.has_content() else None
    if record is None:
        return None, None, None, False
    partition = record["partition-id"] if isinstance(record.get("partition-id"), int) else None
    try:
        return read_audit(record), None, partition, False
    except AuditFailed as err:
        return None, str(err), partition, False
    except Exception as err:  # noqa: BLE001 - anything a hostile record makes the reader raise
        rejection = check_audit(record)
        detail = rejection.detail if rejection is not None else f"malformed audit record ({type(err).__name__}: {err})"
        return None, detail, partition, True


def build_attacks(specs: Sequence[Attack | str | Mapping[str, Any]]) -> list[Attack]:
    """Attacks from names, mappings of a name and knobs (the CLI's YAML), YAML files, or Attack instances."""
    if isinstance(specs, (str, Mapping, Attack)):
        specs = [specs]
    attacks = []
    for i, spec in enumerate(specs):
        if isinstance(spec, Attack):
            attacks.append(spec)
            continue
        if isinstance(spec, str) and spec.endswith((".yaml", ".yml")):
            spec = yaml.safe_load(Path(spec).read_text())
        elif isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping):
            raise ConfigError(f"attacks[{i}]", spec, "an attack name, a mapping such as {'name': 'inverting', "
                              "'iterations': 200}, a YAML file of one, or an Attack")
        attacks.append(build_attack(spec, prefix=f"attacks[{i}]"))
    return attacks


def _plain_yaml(value: Any) -> Any:
    """Tuples -> lists, other non-YAML values -> their text (for config.yaml)."""
    if isinstance(value, Mapping):
        return {str(k): _plain_yaml(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_yaml(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _pop_grant(reply: Message) -> dict[str, Any] | None:
    record = reply.content.pop(GRANT_KEY, None) if reply.has_content() else None
    return dict(record) if record is not None else None


def _targeted(client: int, targets: Any) -> bool:
    if targets == "all":
        return True
    if isinstance(targets, int):
        return client < targets
    return client in set(targets)


def _check_global(arrays: ArrayRecord) -> str | None:
    """Why a new global model cannot be used (an array that does not decode or is not finite), else None."""
    decoded = decode(arrays)
    if not isinstance(decoded, dict):
        return f"the new global model: {decoded.detail}"
    for name, nd in decoded.items():
        if nd.dtype.kind in "fc" and not np.isfinite(nd).all():
            return f"the new global model's '{name}' holds {int((~np.isfinite(nd)).sum())} non-finite values"
    return None


def _model_norm(state: Mapping[str, Tensor]) -> float:
    """L2 norm of a model's floating-point arrays, in float64."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values() if v.is_floating_point()))


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _infer_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("cannot infer the number of classes: give ThreatModel(num_classes=...)")
    return last[-1].out_features


def _infer_input(model: nn.Module) -> tuple[int, ...]:
    layer = first_layer(model).module
    if isinstance(layer, nn.Linear):
        return (layer.in_features,)
    raise ValueError("cannot infer the input shape: give ThreatModel(input_shape=...)")
