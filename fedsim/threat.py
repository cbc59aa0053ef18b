"""What an honest-but-curious server holds: the types that cross the attacker's boundary.

An attack receives an `Observation` and nothing else. Ground truth (the client's real batch) never enters one;
it travels to the scorer on a separate channel (`fedsim.hook`). `Reconstruction` is what an attack returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

Mode = Literal["fedsgd", "fedavg"]


@dataclass(frozen=True)
class Normalization:
    """Per-channel affine map between pixel space [0, 1] and the model's input space.

    model_input = (pixel - mean) / std, channel-wise (one value per channel; vectors use a single channel).
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device)
        if len(self.mean) > 1:  # per channel of (..., C, H, W)
            return mean.view(-1, 1, 1), std.view(-1, 1, 1)
        return mean, std  # one value broadcasts over any shape

    def to_pixels(self, x: Tensor) -> Tensor:
        mean, std = self._stats(x)
        return x * std + mean

    def from_pixels(self, x: Tensor) -> Tensor:
        mean, std = self._stats(x)
        return (x - mean) / std


@dataclass(frozen=True)
class TrainMeta:
    """Training facts the threat model grants the server. `None` means: not known to the attacker."""

    mode: Mode
    input_shape: tuple[int, ...]           # one sample, e.g. (3, 32, 32) or (64,)
    num_classes: int
    normalization: Normalization = Normalization()
    batch_size: int | None = None          # samples per local step
    local_steps: int | None = None         # SGD steps per round (1 in FedSGD)
    lr: float | None = None                # client learning rate
    num_examples: int | None = None        # what the client reported for weighting (always visible in Flower)
    labels: Tensor | None = None           # true labels, only when the threat model grants them
    private: Mapping[str, object] = field(default_factory=dict)  # defense secrets granted to the attacker (e.g. a key)


@dataclass(frozen=True)
class Observation:
    """One client's update in one round, as the server sees it: everything the client sent.

    `update` maps parameter names (as in `model.named_parameters()`) to tensors: the gradient of the mean batch
    loss in FedSGD, the weight delta `local - global` in FedAvg. Tensors are float32 unless the model is not.
    """

    round: int
    client: int
    model: nn.Module                       # a private copy of the global model the server sent (eval mode)
    update: Mapping[str, Tensor]
    meta: TrainMeta
    buffers: Mapping[str, Tensor] = field(default_factory=dict)  # every non-parameter array the client sent
    #   (BatchNorm running statistics, ...), by state-dict name; empty when it sent none (fl.send_buffers=false)

    def gradient(self) -> dict[str, Tensor]:
        """The update as a gradient: itself in FedSGD; `-delta / lr` in FedAvg (exact for one local step)."""
        if self.meta.mode == "fedsgd":
            return dict(self.update)
        if self.meta.lr is None:
            raise ValueError("the learning rate is not known to the attacker; it cannot turn a FedAvg delta into a gradient")
        return {k: -v / self.meta.lr for k, v in self.update.items()}


@dataclass
class Reconstruction:
    """An attack's answer for one observation.

    inputs: (b, *input_shape) in the model's input space (normalised), or None when the attack recovers no data.
    labels: (b,) int64 recovered labels, or None.
    certified: the attack's own claim that the reconstruction is exact (SPEAR), None when it makes no such claim.
    matching_loss: the attack's objective at its answer (gradient distance), when it has one.
    stats: further numbers worth recording (proposals drawn, estimated batch size, ...).
    """

    inputs: Tensor | None
    labels: Tensor | None = None
    certified: bool | None = None
    matching_loss: float | None = None
    stats: dict[str, float | int | bool | str] = field(default_factory=dict)
