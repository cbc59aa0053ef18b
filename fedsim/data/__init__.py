"""Datasets and their partitioning across clients.

Every dataset is loaded whole into tensors (`DataBundle`), already in the model's input space, with the
`Normalization` that maps it back to pixels in [0, 1] for display and scoring. Embedded datasets (`digits`,
`patches`, `synthetic`) come from data shipped inside installed packages and need no download; torchvision
datasets are read from a local root and fail with `DatasetNotFound` naming the path when absent.

Layer: data and models, above the core (schema, registry, threat types); imports nothing of attacks, defenses or
the federation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import Tensor

from fedsim.registry import Registry
from fedsim.threat import Normalization


@dataclass(frozen=True)
class DataBundle:
    """A dataset in memory. x: (N, *input_shape) float32 in model space; y: (N,) int64."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    normalization: Normalization
    kind: Literal["image", "vector"]
    class_names: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its knobs and the function that loads it."""

    Config: type
    load: Callable[[Any], DataBundle]


DATASETS: Registry[DatasetSpec] = Registry("dataset", package="fedsim.data")


def register_dataset(name: str, config: type) -> Callable[[Callable[[Any], DataBundle]], Callable[[Any], DataBundle]]:
    def decorator(load: Callable[[Any], DataBundle]) -> Callable[[Any], DataBundle]:
        DATASETS.register(name)(DatasetSpec(config, load))
        return load

    return decorator


def data_config(node: Any, prefix: str = "data") -> tuple[str, Any]:
    """Validate a `data` config node: (name, typed config)."""
    name, _, config = DATASETS.build(node, prefix)
    return name, config


def load_dataset(node: Any) -> DataBundle:
    """Load (cached per process) the dataset a `data` config node describes."""
    name, config = data_config(node)
    return _load_cached(name, config)


@lru_cache(maxsize=4)
def _load_cached(name: str, config: Any) -> DataBundle:
    return DATASETS.get(name).load(config)


def normalize_images(pixels: Tensor, normalization: Normalization) -> Tensor:
    """(N, C, H, W) pixels in [0, 1] -> model space, float32."""
    return normalization.from_pixels(pixels.float()).contiguous()


def channel_stats(pixels: Tensor) -> Normalization:
    """Per-channel mean and std of (N, C, H, W) pixels (the dataset's own normalisation)."""
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return Normalization(tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std))


def stratified_split(y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, test) with `test_fraction` of every class in the test part, seeded."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in torch.unique(y):
        idx = torch.nonzero(y == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values
