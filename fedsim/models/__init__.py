"""Model zoo, selected as `model=NAME`: fc, lenet, lenet_relu, cnn, resnet18.

Every builder takes its typed config, the input shape of one sample and the number of classes. Initialisation is
seeded by the caller (`build_model`), so the server and every client build the same global model.

Layer: data and models, above the core; `fedsim.models.keylock` holds the key-lock block that the key-lock defense
installs and its attacks read, so that neither imports the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedsim.errors import ConfigError
from fedsim.registry import Registry
from fedsim.schema import knob


@dataclass(frozen=True)
class ModelSpec:
    Config: type
    build: Callable[[Any, tuple[int, ...], int], nn.Module]


MODELS: Registry[ModelSpec] = Registry("model")


def register_model(name: str, config: type):
    def decorator(build):
        MODELS.register(name)(ModelSpec(config, build))
        return build

    return decorator


def model_config(node: Any, prefix: str = "model") -> tuple[str, Any]:
    name, _, config = MODELS.build(node, prefix)
    return name, config


def build_model(node: Any, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """The model a `model` config node describes, initialised from `seed` (global RNG untouched)."""
    name, config = model_config(node)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed also queues GPU seeding
        return MODELS.get(name).build(config, tuple(input_shape), num_classes)


# --- fully connected -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FCConfig:
    widths: tuple[int, ...] = knob((1000, 256), help="hidden widths; the first Linear+ReLU is the layer SPEAR attacks")


class FC(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(widths) -> Linear."""

    def __init__(self, in_features: int, widths: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for width in widths:
            layers += [nn.Linear(prev, width), nn.ReLU()]
            prev = width
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model("fc", FCConfig)
def _fc(cfg: FCConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if not cfg.widths or min(cfg.widths) < 1:
        raise ConfigError("model.widths", list(cfg.widths), "a non-empty list of positive widths")
    return FC(math.prod(input_shape), cfg.widths, num_classes)


# --- LeNet as in DLG (Zhu et al. 2019) -------------------------------------------------------------------------

@dataclass(frozen=True)
class LeNetConfig:
    channels: int = knob(12, ge=1, help="channels of the three convolutions")
    init_range: float | None = knob(0.5, gt=0.0, help="weights and biases ~ U(-r, r) as in DLG; None: PyTorch default")


class LeNet(nn.Module):
    """DLG's LeNet: three 5x5 convolutions (strides 2, 2, 1) with an activation, then one Linear layer."""

    def __init__(self, in_channels: int, hw: tuple[int, int], num_classes: int, channels: int,
                 act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 5, stride=2, padding=2), act(),
            nn.Conv2d(channels, channels, 5, stride=2, padding=2), act(),
            nn.Conv2d(channels, channels, 5, stride=1, padding=2), act(),
        )
        h, w = (hw[0] + 1) // 2, (hw[1] + 1) // 2
        h, w = (h + 1) // 2, (w + 1) // 2
        self.fc = nn.Linear(channels * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def _lenet(act: Callable[[], nn.Module]):
    def build(cfg: LeNetConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        _require_image("lenet", input_shape)
        model = LeNet(input_shape[0], input_shape[1:], num_classes, cfg.channels, act)
        if cfg.init_range is not None:
            for p in model.parameters():
                nn.init.uniform_(p, -cfg.init_range, cfg.init_range)
        return model

    return build


register_model("lenet", LeNetConfig)(_lenet(nn.Sigmoid))
register_model("lenet_relu", LeNetConfig)(_lenet(nn.ReLU))


# --- a small CNN ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CNNConfig:
    channels: tuple[int, int] = knob((32, 64), help="channels of the two 5x5 convolutions")
    hidden: int = knob(256, ge=1, help="width of the hidden Linear layer")


class CNN(nn.Module):
    """conv5x5-ReLU-maxpool, conv5x5-ReLU-maxpool, Linear-ReLU, Linear."""

    def __init__(self, in_channels: int, hw: tuple[int, int], num_classes: int, channels: tuple[int, int],
                 hidden: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        h, w = hw[0] // 4, hw[1] // 4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels[1] * h * w, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("cnn", CNNConfig)
def _cnn(cfg: CNNConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    _require_image("cnn", input_shape, min_side=4)
    return CNN(input_shape[0], input_shape[1:], num_classes, cfg.channels, cfg.hidden)


# --- ResNet-18 --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResNetConfig:
    small_input: bool | None = knob(None, help="3x3 stem without max-pool (CIFAR style); None: when side <= 64")


@register_model("resnet18", ResNetConfig)
def _resnet18(cfg: ResNetConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    from torchvision.models import resnet18  # heavy: torchvision's datasets and models load only when used

    _require_image("resnet18", input_shape)
    model = resnet18(weights=None, num_classes=num_classes)
    small = cfg.small_input if cfg.small_input is not None else max(input_shape[1:]) <= 64
    if small:
        model.conv1 = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif input_shape[0] != 3:
        model.conv1 = nn.Conv2d(input_shape[0], 64, 7, stride=2, padding=3, bias=False)
    return model


def _require_image(name: str, input_shape: tuple[int, ...], min_side: int = 1) -> None:
    if len(input_shape) != 3 or min(input_shape[1:]) < min_side:
        raise ConfigError("model.name", name, f"a model for vectors (fc): {name} needs images (C, H, W) of side "
                          f">= {min_side}, the data gives shape {tuple(input_shape)}")
