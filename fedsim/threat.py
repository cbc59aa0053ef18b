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

from fedsim.errors import ConfigError

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


OPTIMIZERS = ("sgd", "adam", "adamw", "other")


@dataclass(frozen=True)
class Optimizer:
    """The client's local optimizer as the threat model states it (torch's meaning of each knob).

    name: one of OPTIMIZERS ("other": none of these; attacks that replay local training then refuse).
    momentum: SGD's momentum (0: plain SGD); weight_decay: L2 coefficient added to the gradient.
    """

    name: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError("optimizer", self.name, f"one of {', '.join(OPTIMIZERS)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("momentum", self.momentum, "a number in [0, 1)")
        if self.weight_decay < 0.0:
            raise ConfigError("weight_decay", self.weight_decay, "a number >= 0")


def implausible_normalization(inputs: Tensor, norm: Normalization) -> str | None:
    """Why `inputs` (b, C, H, W) in model space cannot be images normalised with `norm`, or None if they can.

    Mapped back to pixels they must lie in [0, 1] (with a little slack) and span most of it; a batch whose pixels
    leave the range, or fill only a sliver of it, was normalised otherwise. The message suggests the mean and std
    that would map the batch's own range onto [0, 1].
    """
    if inputs.dim() != 4 or inputs.shape[0] == 0:
        return None
    x = inputs.detach().double().transpose(0, 1).flatten(1)             # (C, b*H*W)
    channels = x.shape[0]
    if len(norm.mean) not in (1, channels):
        return f"it gives {len(norm.mean)} channel means for images of {channels} channels"
    pixels = norm.to_pixels(inputs.detach().double()).transpose(0, 1).flatten(1)
    low, high = pixels.min(dim=1).values, pixels.max(dim=1).values
    if bool((low >= -0.05).all() and (high <= 1.05).all() and ((high - low) >= 0.6).all()):
        return None
    lo, hi = x.min(dim=1).values, x.max(dim=1).values
    std = 1.0 / (hi - lo).clamp_min(1e-12)
    mean = -lo * std
    fmt = lambda v: "(" + ", ".join(f"{float(a):.3g}" for a in v) + ")"  # noqa: E731
    return (f"mapped back with mean {fmt(norm.mean)} and std {fmt(norm.std)} the pixels span "
            f"[{float(low.min()):.3g}, {float(high.max()):.3g}] instead of [0, 1]; the data suggest mean "
            f"{fmt(mean)} and std {fmt(std)} (torchvision Normalize's values)")


@dataclass(frozen=True)
class TrainMeta:
    """Training facts the threat model grants the server. `None` means: not known to the attacker."""

    mode: Mode
    input_shape: tuple[int, ...]           # one sample, e.g. (3, 32, 32) or (64,)
    num_classes: int
    normalization: Normalization = Normalization()
    batch_size: int | None = None          # samples per local step
    local_steps: int | None = None         # optimizer steps per round (1 in FedSGD)
    lr: float | None = None                # client learning rate
    # How those steps were taken, when the threat model states it in the app's terms (else None / plain SGD):
    local_epochs: int | None = None        # passes over the client's data (local_steps = epochs x batches per epoch)
    distinct_samples: int | None = None    # different samples mixed into the update (epochs repeat the same ones:
    #                                        2 epochs of 4 batches of 8 -> 32; the rank of a first-layer update)
    optimizer: Optimizer = Optimizer()     # the local optimizer (momentum and weight decay change the update)
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
