"""The key-lock block (FedKL: Ren, Deng, Xie, Ma, Ma; arXiv 2305.04095): what `defense=keylock` installs in a
model, and what the attacks on it (`keylock_stats`, `keylock_spear`, `keylock_inversion`) read.

The first parametrised layer of the model becomes a `KeyLockBlock`: layer -> normalisation without affine
parameters -> gamma * h + beta, with gamma and beta from a `KeyLock` (a client's private key and lock layers) or a
`PublicLock` (what a server without the key holds). The defense itself (client mod, server side) is
`defenses/keylock.py`.

Models layer: shared by the attacks and the defense, so that neither imports the other.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord
from torch import Tensor, nn

from fedsim.errors import ConfigError
from fedsim.models.inspect import first_layer

ACTIVATIONS = ("relu", "sigmoid")
PRIVATE_TAG = ".lock."                # private entries of a client's state dict contain this
ATTACKER_KEY = "keylock.attacker"     # in TrainMeta.private: which attacker option is in force
GAMMA_KEY, BETA_KEY = "keylock.gamma", "keylock.beta"


# --- the block -----------------------------------------------------------------------------------------------------

def _act(name: str, x: Tensor) -> Tensor:
    return F.relu(x) if name == "relu" else torch.sigmoid(x)


class KeyLock(nn.Module):
    """A client's private key and lock layers: gamma = act(scale_fc(key)), beta = act(shift_fc(key))."""

    def __init__(self, key_dim: int, channels: int, act: str) -> None:
        super().__init__()
        self.act = act
        self.register_buffer("key", torch.rand(key_dim))
        self.scale_fc = nn.Linear(key_dim, channels)
        self.shift_fc = nn.Linear(key_dim, channels)

    def forward(self) -> tuple[Tensor, Tensor]:
        return _act(self.act, self.scale_fc(self.key)), _act(self.act, self.shift_fc(self.key))


class PublicLock(nn.Module):
    """The lock as the server holds it: gamma and beta from a key and lock layers it drew itself.

    Nothing here is in the state dict (non-persistent buffers), so the server's model has exactly the shared
    parameters. The random key and lock layers are kept for attackers that regress a key through them.
    """

    def __init__(self, key: Tensor, scale_w: Tensor, scale_b: Tensor, shift_w: Tensor, shift_b: Tensor,
                 act: str) -> None:
        super().__init__()
        self.act = act
        for name, value in (("key", key), ("scale_w", scale_w), ("scale_b", scale_b), ("shift_w", shift_w),
                            ("shift_b", shift_b)):
            self.register_buffer(name, value.detach().clone(), persistent=False)
        gamma, beta = self.outputs(self.key)
        self.register_buffer("gamma", gamma.detach(), persistent=False)
        self.register_buffer("beta", beta.detach(), persistent=False)

    def outputs(self, key: Tensor) -> tuple[Tensor, Tensor]:
        """gamma, beta that `key` gives through this lock's layers (differentiable in `key`)."""
        return (_act(self.act, F.linear(key, self.scale_w, self.scale_b)),
                _act(self.act, F.linear(key, self.shift_w, self.shift_b)))

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.gamma, self.beta


class KeyLockBlock(nn.Module):
    """layer -> normalisation without affine parameters -> gamma * h + beta, gamma and beta from `lock`.

    layer: nn.Conv2d (output (b, C, H, W)) or nn.Linear (output (b, C)). norm: "batch" or "running".
    update_running: with norm="running", whether forward passes in training mode update the running statistics
        (a client's model does; the server's, and every attacker's copy of it, keeps the statistics it received).
    """

    def __init__(self, layer: nn.Module, lock: nn.Module, norm: str, momentum: float = 0.1, eps: float = 1e-5,
                 update_running: bool = True) -> None:
        super().__init__()
        channels = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        self.layer = layer
        self.norm = (nn.BatchNorm2d if isinstance(layer, nn.Conv2d) else nn.BatchNorm1d)(
            channels, affine=False, momentum=momentum, eps=eps)
        self.lock = lock
        self.norm_mode = norm
        self.update_running = update_running
        self.conv = isinstance(layer, nn.Conv2d)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer(x)
        if self.norm_mode == "batch":
            h_hat = self.norm(h)
        else:
            h_hat = self._running(h)
        gamma, beta = self.lock()
        if self.conv:
            return gamma[None, :, None, None] * h_hat + beta[None, :, None, None]
        return gamma[None, :] * h_hat + beta[None, :]

    def _running(self, h: Tensor) -> Tensor:
        """Normalise with the running statistics as they were; then update them from this batch (no gradient)."""
        norm = self.norm
        out = F.batch_norm(h, norm.running_mean.clone(), norm.running_var.clone(), None, None, False, 0.0, norm.eps)
        if self.training and self.update_running:
            with torch.no_grad():
                dims = [0, 2, 3] if self.conv else [0]
                mean = h.mean(dim=dims)
                var = h.var(dim=dims, unbiased=True)  # as BatchNorm's running variance
                norm.running_mean.mul_(1 - norm.momentum).add_(norm.momentum * mean)
                norm.running_var.mul_(1 - norm.momentum).add_(norm.momentum * var)
                norm.num_batches_tracked.add_(1)
        return out


def lock_blocks(model: nn.Module) -> dict[str, KeyLockBlock]:
    """The key-lock blocks of `model` by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, KeyLockBlock)}


def first_lockable(model: nn.Module) -> str:
    """Module path of the first Conv2d or Linear layer the input reaches."""
    try:
        layer = first_layer(model)
    except ValueError:
        layer = None
    if layer is not None and isinstance(layer.module, (nn.Conv2d, nn.Linear)):
        return layer.name
    for name, module in model.named_modules():  # untraceable models: the first such module in definition order
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return name
    raise ConfigError("defense.name", "keylock", f"a model with a Conv2d or Linear layer ({type(model).__name__})")


def install_block(model: nn.Module, path: str, lock_factory, norm: str, update_running: bool = True) -> nn.Module:
    """Replace the module at `path` by a KeyLockBlock around it (in place; returns the model)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layer = getattr(parent, child)
    channels = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    setattr(parent, child, KeyLockBlock(layer, lock_factory(channels), norm, update_running=update_running))
    return model


def is_private(name: str) -> bool:
    """Whether a state-dict entry belongs to a client's key and lock layers (never leaves the client)."""
    return PRIVATE_TAG in f".{name}"


def shared(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a state dict that clients share."""
    return {k: v for k, v in state.items() if not is_private(k)}


def _seeded_lock(key_dim: int, channels: int, act: str, gen: torch.Generator) -> KeyLock:
    """A KeyLock whose key and layers are drawn from `gen` (key ~ U[0,1); layers: PyTorch's default init)."""
    lock = KeyLock(key_dim, channels, act)
    bound = 1.0 / math.sqrt(key_dim)
    with torch.no_grad():
        lock.key.copy_(torch.rand(key_dim, generator=gen))
        for fc in (lock.scale_fc, lock.shift_fc):
            fc.weight.copy_(torch.rand(fc.weight.shape, generator=gen) * 2 * bound - bound)
            fc.bias.copy_(torch.rand(fc.bias.shape, generator=gen) * 2 * bound - bound)
    return lock


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def lock_outputs(private: Mapping[str, Tensor], act: str) -> dict[str, tuple[Tensor, Tensor]]:
    """gamma, beta of every block (by module path) from a client's private state entries."""
    out = {}
    for name in private:
        if name.endswith(".lock.key"):
            path = name[: -len(".lock.key")]
            key, lock = private[name], f"{path}.lock"
            gamma = _act(act, F.linear(key, private[f"{lock}.scale_fc.weight"], private[f"{lock}.scale_fc.bias"]))
            beta = _act(act, F.linear(key, private[f"{lock}.shift_fc.weight"], private[f"{lock}.shift_fc.bias"]))
            out[path] = (gamma.detach(), beta.detach())
    return out


def grant_record(outputs: Mapping[str, tuple[Tensor, Tensor]]) -> ConfigRecord:
    """gamma and beta of every block, for the attacker under `known_key` (fedsim.hook.GRANT_KEY)."""
    record: dict[str, Any] = {}
    for path, (gamma, beta) in outputs.items():
        record[f"{GAMMA_KEY}:{path}"] = gamma.float().numpy().tobytes()
        record[f"{BETA_KEY}:{path}"] = beta.float().numpy().tobytes()
    return ConfigRecord(record)


def granted_lock(private: Mapping[str, Any]) -> dict[str, tuple[Tensor, Tensor]] | None:
    """Decode `grant_record` entries from TrainMeta.private; None when nothing was granted."""
    out = {}
    for key, value in private.items():
        if key.startswith(f"{GAMMA_KEY}:"):
            path = key.split(":", 1)[1]
            gamma = torch.from_numpy(np.frombuffer(value, dtype=np.float32).copy())
            beta = torch.from_numpy(np.frombuffer(private[f"{BETA_KEY}:{path}"], dtype=np.float32).copy())
            out[path] = (gamma, beta)
    return out or None
