"""Partitioning a training set across clients with Flower Datasets' partitioners, seeded."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedsim.errors import ConfigError
from fedsim.schema import build_config, knob, plain

SCHEMES = ("iid", "dirichlet", "pathological")


@dataclass(frozen=True)
class PartitionConfig:
    scheme: str = knob("iid", choices=SCHEMES, help="how the training set is split across clients")
    alpha: float = knob(0.5, gt=0.0, help="dirichlet: concentration (small = skewed label mix)")
    classes_per_client: int = knob(2, ge=1, help="pathological: classes each client holds")
    min_size: int = knob(1, ge=0, help="dirichlet: resample until every client holds at least this many")


def partition_config(node) -> PartitionConfig:
    return build_config(PartitionConfig, plain(node) or {}, "partition")


def partition(labels: torch.Tensor, num_partitions: int, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Indices into the training set for each client (sorted), deterministic in `seed`."""
    return list(_partition(tuple(labels.tolist()), num_partitions, cfg, seed))


@lru_cache(maxsize=8)
def _partition(labels: tuple[int, ...], num_partitions: int, cfg: PartitionConfig, seed: int) -> tuple[np.ndarray, ...]:
    import datasets  # heavy: Hugging Face datasets loads only for flwr-datasets' partitioners
    from flwr_datasets.partitioner import (  # heavy: flwr-datasets loads only for its partitioners
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    datasets.disable_progress_bars()
    n = len(labels)
    if num_partitions > n:
        raise ConfigError("fl.clients", num_partitions, f"at most {n} (the training set's size)")
    table = datasets.Dataset.from_dict({"index": np.arange(n), "label": np.asarray(labels)})
    if cfg.scheme == "iid":
        table = table.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions)
    elif cfg.scheme == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions, "label", cfg.alpha, min_partition_size=cfg.min_size,
                                           self_balancing=True, seed=seed)
    else:
        classes = len(set(labels))
        if cfg.classes_per_client > classes:
            raise ConfigError("partition.classes_per_client", cfg.classes_per_client, f"at most {classes}")
        partitioner = PathologicalPartitioner(num_partitions, "label", cfg.classes_per_client,
                                              class_assignment_mode="random", seed=seed)
    partitioner.dataset = table
    parts = []
    for pid in range(num_partitions):
        idx = np.sort(np.asarray(partitioner.load_partition(pid)["index"], dtype=np.int64))
        parts.append(idx)
    return tuple(parts)
