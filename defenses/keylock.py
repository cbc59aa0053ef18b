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

import secrets
from dataclasses import dataclass, replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor, nn

from fedsim.defenses.base import ClientMod, ClientSide, Defense, register_defense
from fedsim.data import load_dataset
from fedsim.errors import ConfigError
from fedsim.models import build_model
from fedsim.models.keylock import (  # noqa: F401
    ACTIVATIONS,
    ATTACKER_KEY,
    KeyLock,
    KeyLockBlock,
    PublicLock,
    _seeded_lock,
    copy_model,
    first_lockable,
    grant_record,
    granted_lock,
    install_block,
    is_private,
    lock_blocks,
    lock_outputs,
    shared,
)
from fedsim.protocol import CLIENT_KEY, CONFIG_KEY, GRANT_KEY, KEY_SEED, may_audit, partition_id
from fedsim.schema import knob
from fedsim.seeds import KEYLOCK_KEY_STREAM, KEYLOCK_SERVER_STREAM, seed_for

NORMS = ("batch", "running")
ATTACKERS = ("no_key", "known_key", "regress_key", "adaptive")
STATE_KEY = "fedsim.keylock"          # in the client's Context.state: its key and lock layers


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
        gen = torch.Generator().manual_seed(seed_for(seed, client, KEYLOCK_KEY_STREAM))
        out = {}
        for path, block in lock_blocks(model).items():
            lock = _seeded_lock(cfg.key_dim, block.norm.num_features, cfg.act, gen)
            out.update({f"{path}.lock.{k}": v.detach().clone() for k, v in lock.state_dict().items()})
        return out

    # -- protocol -----------------------------------------------------------------------------------------------
    def client_mods(self) -> list[ClientMod]:
        """Innermost on the client (it decides which layers the update holds): restore the private layers into
        every model received, strip them from every update sent."""
        return [ClientMod("model", keylock_mod)]

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
            bundle = load_dataset(run.data)
            model = build_model(run.model, bundle.input_shape, bundle.num_classes, run.seed)
            if isinstance(model.get_submodule(first_lockable(model)), nn.Linear):
                raise ConfigError("fl.batch_size", run.fl.batch_size,
                                  f"at least 2 with {prefix}.norm=batch on a Linear first layer (batch statistics "
                                  f"of one sample are undefined); or {prefix}.norm=running")


def _server_seed(cfg: KeyLockConfig) -> int:
    return seed_for(cfg.key_seed if cfg.key_seed is not None else 0, KEYLOCK_SERVER_STREAM)


# --- client side: the private layers never leave --------------------------------------------------------------------

def keylock_mod(msg: Message, context: Context, call_next: ClientAppCallable, plan: ClientSide) -> Message:
    """Restore the client's key and lock layers into every model it receives; strip them from what it sends.

    The first time, they are drawn from the client's private seed; afterwards they live in `context.state`
    (updated with each round's local training: new weights in FedAvg, one SGD step on their gradient in FedSGD).
    """
    if msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE) or not msg.has_content():
        return call_next(msg, context)
    if "arrays" not in msg.content.array_records or "config" not in msg.content.config_records:
        return call_next(msg, context)
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


def _private_state(context: Context, plan: ClientSide, lock: KeyLockDefense, client: int) -> dict[str, Tensor]:
    if STATE_KEY in context.state.array_records:
        return context.state.array_records[STATE_KEY].to_torch_state_dict()
    # the client's own model (built once per process by its plan) gives the blocks' shapes; nothing is rebuilt
    state = lock.private_state(plan.model(), node_key_seed(context), client)
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
