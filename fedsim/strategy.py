"""fedsim's own server strategy: FedAvg or FedSGD with reproducible client sampling and aggregation order.

Flower's FedAvg samples nodes with the global `random` module over node ids that are random per run, and sums
replies in arrival order. Here clients are sampled by partition id from a generator seeded with (seed, round), and
replies are aggregated sorted by partition id, so the same config and seed give the same model on every runtime.
In FedSGD the replies carry gradients: the new model is `global - lr * weighted mean gradient`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.arrays import records, to_numpy, to_state_dict
from fedsim.hook import CLIENT_KEY


def partition_of_reply(reply: Message, partition_of: Mapping[int, int]) -> int:
    """The partition of the node the reply came from (fixed at discovery; never what the reply claims)."""
    return partition_of.get(reply.metadata.src_node_id, 1 << 62)


def weighted_mean(contents: list[RecordDict], weight_key: str) -> ArrayRecord:
    """FedAvg's average: Flower's `aggregate_arrayrecords`, the same numpy arithmetic in the same order (so the
    same bits), reading the arrays with `fedsim.arrays`."""
    weights = [next(iter(records(c, MetricRecord).values()))[weight_key] for c in contents]
    total = sum(weights)
    mean: dict[str, np.ndarray] = {}
    dtypes: dict[str, np.dtype] = {}
    product: dict[str, np.ndarray] = {}  # each reply's `values * factor`, written into one buffer per array
    for content, weight in zip(contents, weights):
        factor = weight / total
        for record in records(content, ArrayRecord).values():
            for name, array in record.items():
                values = to_numpy(array, copy=False)  # read only
                if name not in mean:
                    dtypes[name] = values.dtype
                    mean[name] = values * factor
                    product[name] = np.empty_like(mean[name])
                elif product[name].shape == values.shape and product[name].dtype == np.result_type(values, factor):
                    mean[name] += np.multiply(values, factor, out=product[name])
                else:  # what numpy makes of it (an error, or a broadcast), as Flower's arithmetic would
                    mean[name] += values * factor
    # integer buffers (BatchNorm's num_batches_tracked) stay integers: the model's dtype, not float64
    return ArrayRecord({name: Array(np.asarray(value) if dtypes[name].kind in "fc"
                                    else np.asarray(np.rint(value)).astype(dtypes[name]))
                        for name, value in mean.items()})


def weighted_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """The clients' metrics averaged by `weight_key`: Flower's `aggregate_metricrecords`, the same arithmetic in
    the same order, summed in a plain dict (Flower re-reads each reply's records and re-checks every partial sum
    on the way, 0.1 ms a reply)."""
    metrics = [list(records(c, MetricRecord).values()) for c in contents]
    weights = [found[0][weight_key] for found in metrics]
    total = sum(weights)
    factors = [w / total for w in weights]
    mean: dict = {}
    for found, weight in zip(metrics, factors, strict=True):
        for record in found:
            for key, value in record.items():
                if key == weight_key:
                    continue
                if key not in mean:
                    mean[key] = [v * weight for v in value] if isinstance(value, list) else value * weight
                elif isinstance(value, list):
                    mean[key] = [c + v * weight for c, v in zip(mean[key], value, strict=True)]
                else:
                    mean[key] = mean[key] + value * weight
    return MetricRecord(mean)


class FedsimStrategy(FedAvg):
    """FedAvg (weights) or FedSGD (gradients) over clients sampled reproducibly by partition id."""

    def __init__(self, *, partition_of: Mapping[int, int], mode: str, lr: float, seed: int,
                 clients_per_round: int | None = None, buffers: Iterable[str] | None = None) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=0,
                         min_available_nodes=1, train_metrics_aggr_fn=weighted_metrics)
        self.partition_of = dict(partition_of)           # node id -> partition id
        self.node_of = {p: n for n, p in self.partition_of.items()}
        self.mode, self.lr, self.seed = mode, lr, seed
        self.clients_per_round = clients_per_round
        self.buffers = set(buffers) if buffers is not None else None  # the model's buffers, as the server knows them
        self._global: dict[int, dict[str, torch.Tensor]] = {}
        self.rounds_taken: dict[int, int] = {}          # partition id -> rounds it was asked to train in

    def most_rounds(self) -> int:
        """The most rounds any one client was asked to train in so far (0 before the first)."""
        return max(self.rounds_taken.values(), default=0)

    def sample(self, server_round: int) -> list[int]:
        """Partition ids of the clients trained in `server_round` (sorted)."""
        partitions = sorted(self.node_of)
        k = self.clients_per_round or len(partitions)
        if k >= len(partitions):
            return partitions
        rng = np.random.default_rng([self.seed, server_round, 0x5E])
        return sorted(int(p) for p in rng.choice(partitions, size=k, replace=False))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        self._global[server_round] = arrays.to_torch_state_dict()
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        chosen = self.sample(server_round)
        for p in chosen:
            self.rounds_taken[p] = self.rounds_taken.get(p, 0) + 1
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=self.node_of[p],
                        group_id=str(server_round)) for p in chosen]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the server evaluates the global model itself (evaluate_fn)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = sorted(replies, key=lambda r: partition_of_reply(r, self.partition_of))
        global_state = self._global.pop(server_round, None)
        # the curious hook screened every reply completely (fedsim.screen) before it gets here
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if self.mode == "fedavg":
            if not valid:
                return None, None
            contents = [m.content for m in valid]
            mean = weighted_mean(contents, self.weighted_by_key)
            for name, value in (global_state or {}).items():  # buffers no client sent (fl.send_buffers=false)
                if name not in mean:
                    mean[name] = Array(value.numpy())
            return mean, self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        if not valid or global_state is None:
            return None, None
        return self._sgd_step(valid, global_state), self.train_metrics_aggr_fn(
            [m.content for m in valid], self.weighted_by_key)

    def _sgd_step(self, replies: list[Message], global_state: dict[str, torch.Tensor]) -> ArrayRecord:
        """global - lr * (weighted mean gradient) for parameters; weighted mean for buffers the clients sent."""
        weights = [float(next(iter(records(r.content, MetricRecord).values()))[self.weighted_by_key])
                   for r in replies]
        total = sum(weights)
        states = [to_state_dict(r.content[self.arrayrecord_key]) for r in replies]
        buffers = set() if self.buffers is None else self.buffers
        for r in replies if self.buffers is None else ():  # else only the server's own list, never a claim
            info = records(r.content, ConfigRecord).get(CLIENT_KEY)
            if info is not None and "buffers" in info:
                buffers.update(str(b) for b in info["buffers"])
        new_state = {}
        for name, value in global_state.items():
            if any(name not in s for s in states):  # a buffer the clients keep (fl.send_buffers=false)
                new_state[name] = value
                continue
            if not value.is_floating_point():
                new_state[name] = states[0].get(name, value) if name in buffers else value
                continue
            mean = sum((w / total) * s[name].to(torch.float64) for w, s in zip(weights, states))
            if name in buffers:
                new_state[name] = mean.to(value.dtype)
            else:
                new_state[name] = (value.to(torch.float64) - self.lr * mean).to(value.dtype)
        return ArrayRecord(new_state)
