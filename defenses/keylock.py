"""The key-lock module (FedKL: Ren, Deng, Xie, Ma, Ma; arXiv 2305.04095) (`defense=keylock`).

The first parametrised layer of the model (a Conv2d or a Linear) becomes a `KeyLockBlock`:

    h = layer(x);  h_hat = norm(h)  (BatchNorm without affine parameters);  out = gamma * h_hat + beta
    gamma = act(scale_fc(key)),  beta = act(shift_fc(key))                      (FiLM, per output channel)

`key` (key_dim values ~ U[0, 1), fixed) and the lock layers `scale_fc`, `shift_fc` (Linear(key_dim, channels)) are
private to each client: drawn from the client's own seed (its node config's `fedsim-key-seed`, else its OS
randomness; never anything the server sends), kept in the client's Flower `Context.state`, trained locally,
restored into every model the client downloads, and stripped from every update it sends (`keylock_mod`).
The server only ever holds and aggregates the shared parameters; its own model (`build_model(private=False)`)
carries gamma and beta from a random key of its own (not saved in its state dict), which is what a server without
the key can evaluate: `accuracy` in rounds.jsonl is that random-key accuracy, and `client_accuracy` is the
accuracy clients get from the same global model with their own keys (each client evaluates it on the test split
every round, `ClientEvaluation`).

Normalisation (`norm`):
- `batch` (FedKL): BatchNorm in training mode while clients train: batch statistics. After the first layer this
  makes the whole forward pass, hence every gradient, invariant to x_i -> c + t (x_i - mean(x)) for any vector c
  and t > 0 (up to BN's eps), and for an FC layer it cancels the bias gradient: the gradients alone do not give a
  batch's mean or contrast. The client's reply does, though: it carries the block's BatchNorm running statistics,
  updated from that batch, and the server sees them (as it sees everything sent). From `running_mean` the server
  solves `W xbar + b = batch mean of h` for the batch mean without the key (measured: relative error 6.5e-8,
  digits, fc [256, 256], FedSGD, batch 8, defaults; only W's row space when the layer is narrower than its input:
  0.81 for fc [1000, 256] on 3072-pixel patches), and `running_var` gives each channel's batch variance, hence the
  contrast (`attack=keylock_stats`; `keylock_spear` uses both). `fl.send_buffers=false` keeps them on the client.
- `running`: normalise with the running statistics (updated from each batch, never back-propagated), i.e. an
  affine map per channel that the server knows from the global model's buffers.

Attacker options (`attacker`, a threat-model setting, handed to attacks in `TrainMeta.private`):
- `no_key` (FedKL's setting): the attacker holds the server's model, random gamma and beta.
- `known_key`: the client's gamma and beta (what key and lock layers produce) are granted to the attacker, through
  the `fedsim.hook.GRANT_KEY` side channel; the attacker's model carries them. Like the audit channel, a client
  sends them only in a simulation or when its operator consents (`fedsim.audit.may_audit`): a real SuperNode never
  hands its key to a server that asks.
- `regress_key`: the key is optimised jointly with the data, through the server's own (wrong) lock layers.
- `adaptive`: gamma and beta themselves (2 x channels numbers) are optimised jointly with the data.
Attacks that only optimise inputs treat `regress_key` and `adaptive` as `no_key`; `attack=keylock_inversion`
implements all four.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor, nn

from defenses.base import Defense, register_defense
from fedsim.config import knob
from fedsim.errors import ConfigError

ACTIVATIONS = ("relu", "sigmoid")
NORMS = ("batch", "running")
ATTACKERS = ("no_key", "known_key", "regress_key", "adaptive")
STATE_KEY = "fedsim.keylock"          # in the client's Context.state: its key and lock layers
PRIVATE_TAG = ".lock."                # private entries of a client's state dict contain this
ATTACKER_KEY = "keylock.attacker"     # in TrainMeta.private: which attacker option is in force
KEY_SEED = "fedsim-key-seed"          # node config: this client's private key seed (fedsim.runtime.KEY_SEED)
GAMMA_KEY, BETA_KEY = "keylock.gamma", "keylock.beta"
_KEY_STREAM, _SERVER_STREAM = 0x10C4, 0x5E4C


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
    from fedsim.models.inspect import first_layer

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


# --- the defense ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyLockConfig:
    key_dim: int = knob(1024, ge=1, help="length of each client's private key (FedKL: 1024)")
    act: str = knob("relu", choices=ACTIVATIONS, help="activation on the lock layers' outputs (FedKL: relu)")
    norm: str = knob("batch", choices=NORMS, help="batch: batch statistics in training (FedKL); running: "
                                                    "normalise with the running statistics (an affine map)")
    attacker: str = knob("no_key", choices=ATTACKERS, help="what the attacker knows of the lock: no_key, known_key, "
                                                             "regress_key, adaptive")
    key_seed: int | None = knob(None, help="seed of the server's own random lock (what a server without the key "
                                           "holds); null: 0. Clients' keys never come from the server's config: "
                                           "see nodes.key_seed")
    client_evaluation: bool = knob(True, help="clients evaluate each global model with their own keys "
                                              "(client_accuracy)")


@register_defense("keylock")
class KeyLockDefense(Defense):
    """Lock the first layer with a per-client key; the key and lock layers never leave the client."""

    name = "keylock"
    Config = KeyLockConfig

    def strength(self) -> dict[str, float | str]:
        cfg = self.config
        return {"key_dim": cfg.key_dim, "act": cfg.act, "norm": cfg.norm, "attacker": cfg.attacker}

    # -- models -----------------------------------------------------------------------------------------------
    def build_model(self, model: nn.Module, *, private: bool) -> nn.Module:
        cfg = self.config
        if private:  # placeholder values: the client loads its own key and lock layers into them (keylock_mod)
            with torch.random.fork_rng(devices=[]):
                return install_block(model, first_lockable(model), lambda c: KeyLock(cfg.key_dim, c, cfg.act),
                                     cfg.norm)
        gen = torch.Generator().manual_seed(_server_seed(cfg))

        def public(channels: int) -> PublicLock:  # the server's own draw, as a client would make one
            template = _seeded_lock(cfg.key_dim, channels, cfg.act, gen)
            return PublicLock(template.key, template.scale_fc.weight, template.scale_fc.bias,
                              template.shift_fc.weight, template.shift_fc.bias, cfg.act)

        return install_block(model, first_lockable(model), public, cfg.norm, update_running=False)

    def private_state(self, model: nn.Module, seed: int, client: int) -> dict[str, Tensor]:
        """A client's initial key and lock layers (its private entries of `model`'s state dict), drawn from its
        own private `seed` (from its node, never from the server)."""
        cfg = self.config
        gen = torch.Generator().manual_seed(_seed(seed, client, _KEY_STREAM))
        out = {}
        for path, block in lock_blocks(model).items():
            lock = _seeded_lock(cfg.key_dim, block.norm.num_features, cfg.act, gen)
            out.update({f"{path}.lock.{k}": v.detach().clone() for k, v in lock.state_dict().items()})
        return out

    # -- protocol -----------------------------------------------------------------------------------------------
    def wrap_strategy(self, strategy: Strategy) -> Strategy:
        return ClientEvaluation(strategy) if self.config.client_evaluation else strategy

    def observe(self, obs):
        """The attacker's model under the threat setting: the client's gamma and beta only with `known_key`."""
        cfg = self.config
        private = dict(obs.meta.private)
        private[ATTACKER_KEY] = cfg.attacker
        model = obs.model
        if cfg.attacker == "known_key":
            granted = granted_lock(private)
            if granted is not None:
                model = copy_model(obs.model)
                for path, block in lock_blocks(model).items():
                    gamma, beta = granted[path]
                    block.lock.gamma.copy_(gamma)
                    block.lock.beta.copy_(beta)
            private["keylock.known"] = granted is not None
        private = {k: v for k, v in private.items() if not k.startswith(("keylock.gamma", "keylock.beta"))}
        return replace(obs, model=model, meta=replace(obs.meta, private=private))

    def check_run(self, run, prefix: str = "defense") -> None:
        if self.config.norm == "batch" and run.fl.batch_size < 2:
            from fedsim.data import load_dataset
            from fedsim.models import build_model

            bundle = load_dataset(run.data)
            model = build_model(run.model, bundle.input_shape, bundle.num_classes, run.seed)
            if isinstance(model.get_submodule(first_lockable(model)), nn.Linear):
                raise ConfigError("fl.batch_size", run.fl.batch_size,
                                  f"at least 2 with {prefix}.norm=batch on a Linear first layer (batch statistics "
                                  f"of one sample are undefined); or {prefix}.norm=running")


def _seed(*parts: int) -> int:
    from fedsim.training import seed_for

    return seed_for(*parts)


def _server_seed(cfg: KeyLockConfig) -> int:
    return _seed(cfg.key_seed if cfg.key_seed is not None else 0, _SERVER_STREAM)


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
    import copy

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


# --- client side: the private layers never leave --------------------------------------------------------------------

def keylock_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Restore the client's key and lock layers into every model it receives; strip them from what it sends.

    The first time, they are drawn from the client's private seed; afterwards they live in `context.state`
    (updated with each round's local training: new weights in FedAvg, one SGD step on their gradient in FedSGD).
    """
    if msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE) or not msg.has_content():
        return call_next(msg, context)
    if "arrays" not in msg.content.array_records or "config" not in msg.content.config_records:
        return call_next(msg, context)
    from fedsim.audit import may_audit
    from fedsim.client_app import CONFIG_KEY, client_plan, partition_id
    from fedsim.hook import CLIENT_KEY, GRANT_KEY

    plan = client_plan(str(msg.content["config"][CONFIG_KEY]))
    lock = plan.defense.find(KeyLockDefense)
    if lock is None:
        return call_next(msg, context)
    private = _private_state(context, plan, lock, partition_id(context))
    received = msg.content["arrays"].to_torch_state_dict()
    msg.content["arrays"] = ArrayRecord({**received, **private})
    out = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or out.has_error():
        return out
    sent = out.content["arrays"].to_torch_state_dict()
    info = out.content[CLIENT_KEY]
    buffers = set(info.get("buffers", []) or [])
    if plan.fl.mode == "fedsgd":  # the reply holds gradients: the client takes its own step on its private layers
        updated = {k: (sent[k] if k in buffers else private[k] - plan.fl.lr * sent[k]) for k in private}
    else:
        updated = {k: sent[k] for k in private}
    context.state[STATE_KEY] = ArrayRecord(updated)
    out.content["arrays"] = ArrayRecord(shared(sent))
    out.content[CLIENT_KEY] = ConfigRecord({**dict(info), "buffers": [b for b in buffers if not is_private(b)]})
    if lock.config.attacker == "known_key" and may_audit(context):  # simulation (or consent) only
        out.content[GRANT_KEY] = grant_record(lock_outputs(private, lock.config.act))
    return out


def _private_state(context: Context, plan, lock: KeyLockDefense, client: int) -> dict[str, Tensor]:
    if STATE_KEY in context.state.array_records:
        return context.state.array_records[STATE_KEY].to_torch_state_dict()
    from fedsim.data import load_dataset
    from fedsim.models import build_model

    run = plan.run
    bundle = load_dataset(run.data)
    model = lock.build_model(build_model(run.model, bundle.input_shape, bundle.num_classes, run.seed), private=True)
    state = lock.private_state(model, node_key_seed(context), client)
    context.state[STATE_KEY] = ArrayRecord(state)
    return state


def node_key_seed(context: Context) -> int:
    """The seed of this client's key: its node config's `fedsim-key-seed` (a simulation's `nodes.key_seed`, a
    SuperNode operator's --node-config), else fresh OS randomness. Never the run config, which the server sends."""
    value = context.node_config.get(KEY_SEED)
    if value is not None:
        return int(value)
    return secrets.randbits(63)


# --- server side: clients evaluate with their own keys ----------------------------------------------------------------

class ClientEvaluation(Strategy):
    """Delegates to `inner`; after each round every client evaluates the new global model on the test split with
    its own private layers, and the weighted means come back as `client_accuracy` and `client_loss`."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self._config: ConfigRecord | None = None

    def __getattr__(self, name: str) -> Any:  # attributes of the wrapped strategy (e.g. arrayrecord_key)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        from fedsim.client_app import CONFIG_KEY

        self._config = ConfigRecord({CONFIG_KEY: config[CONFIG_KEY]}) if CONFIG_KEY in config else None
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if self._config is None:
            return self.inner.configure_evaluate(server_round, arrays, config, grid)
        cfg = ConfigRecord({**dict(self._config), "server-round": server_round})
        return [Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=node,
                        message_type=MessageType.EVALUATE, group_id=str(server_round))
                for node in sorted(grid.get_node_ids())]

    def aggregate_evaluate(self, server_round: int, replies) -> MetricRecord | None:
        rows = [r.content["metrics"] for r in replies if not r.has_error() and "metrics" in r.content.metric_records]
        if not rows:
            return None
        weights = [float(m["num-examples"]) for m in rows]
        total = sum(weights)
        accuracy = [float(m["accuracy"]) for m in rows]
        return MetricRecord({
            "client_accuracy": sum(w * a for w, a in zip(weights, accuracy)) / total,
            "client_loss": sum(w * float(m["loss"]) for w, m in zip(weights, rows)) / total,
            "client_accuracy_min": min(accuracy), "client_accuracy_max": max(accuracy),
            "clients_evaluated": len(rows),
        })
