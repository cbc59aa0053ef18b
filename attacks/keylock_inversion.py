"""Gradient inversion against the key-lock module, under each attacker option of `defense=keylock`.

Inverting Gradients' recipe (Geiping et al. 2020: signed Adam on one global cosine distance plus total variation,
boxed to valid images, step size x0.1 at 3/8, 5/8 and 7/8 of the budget), extended with the unknowns of the lock.
The option in force comes from the threat model (`TrainMeta.private["keylock.attacker"]`, set by
`fedsim.defenses.keylock.KeyLockDefense.observe`):

- `no_key`: gamma and beta are the server's own random ones, fixed (FedKL's setting).
- `known_key`: the client's gamma and beta, granted by the threat model, fixed.
- `regress_key`: a key (init U[0, 1)) optimised jointly with the inputs, through the server's own random lock
  layers (the client's are private too): FedKL's `gen_key`.
- `adaptive`: gamma and beta (2 x channels numbers per locked layer) optimised directly, jointly with the inputs,
  from gamma = 1, beta = 0, kept in the range of the lock's activation. The secret that matters is these vectors,
  not the 1024-d key behind them.

On a model without a key-lock block it is plain Inverting Gradients. Labels: granted ones, else iDLG (one sample:
the negative entry of the last bias gradient) or Yin et al.'s rule (distinct labels, most negative row minimum).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fedsim.attacks.base import Attack, register_attack
from fedsim.attacks.matching import cosine_distance, total_variation
from fedsim.errors import AttackNotApplicable, ReconstructionFailed
from fedsim.models.keylock import ATTACKER_KEY, PublicLock, lock_blocks
from fedsim.schema import knob
from fedsim.threat import Observation, Reconstruction, TrainMeta

OPTIONS = ("no_key", "known_key", "regress_key", "adaptive")
_MILESTONES = (3 / 8, 5 / 8, 7 / 8)


@dataclass(frozen=True)
class KeyLockInversionConfig:
    iterations: int = knob(1000, ge=1, help="optimiser steps per restart")
    restarts: int = knob(1, ge=1, help="random starts; the lowest matching loss wins")
    lr: float = knob(0.1, gt=0, help="signed-Adam step on the inputs (IG: 0.1)")
    lock_lr: float = knob(0.01, gt=0, help="signed-Adam step on the key or on gamma and beta")
    tv_weight: float = knob(1e-2, ge=0, help="weight of the inputs' total variation (model space)")
    time_budget: float | None = knob(None, gt=0, help="seconds for all restarts together; null: no limit")
    seed: int = knob(0, help="seed of the random starts")


@register_attack("keylock_inversion")
class KeyLockInversion(Attack):
    """Inverting Gradients with the key-lock unknowns (key, or gamma and beta) optimised jointly, per option."""

    name = "keylock_inversion"
    Config = KeyLockInversionConfig

    def check(self, model: nn.Module, meta: TrainMeta) -> None:
        super().check(model, meta)
        if meta.batch_size is None and meta.labels is None:
            raise AttackNotApplicable("keylock_inversion needs the threat model to grant batch_size (or labels)")
        if not [m for m in model.modules() if isinstance(m, nn.Linear)]:
            raise AttackNotApplicable("keylock_inversion needs a last Linear layer to recover labels")

    def reconstruct(self, obs: Observation) -> Reconstruction:
        cfg, meta = self.config, obs.meta
        option = str(meta.private.get(ATTACKER_KEY, "no_key"))
        if option not in OPTIONS:
            raise ReconstructionFailed(f"unknown key-lock attacker option {option!r}")
        model = copy.deepcopy(obs.model).train()  # the client trained in train mode (batch statistics)
        for p in model.parameters():
            p.requires_grad_(False)
        target = {k: v.detach() for k, v in obs.gradient().items()}
        count = int(meta.labels.numel()) if meta.labels is not None else int(meta.batch_size)
        labels = meta.labels.long().reshape(-1) if meta.labels is not None else recover_labels(model, target, count)
        blocks = {path: b for path, b in lock_blocks(model).items() if isinstance(b.lock, PublicLock)}
        lower, upper = _box(meta)
        gen = torch.Generator().manual_seed(cfg.seed)
        start = time.perf_counter()
        best = None
        for restart in range(cfg.restarts):
            deadline = math.inf if cfg.time_budget is None else start + cfg.time_budget * (restart + 1) / cfg.restarts
            run = _Run(model, target, labels, blocks, option, lower, upper, (count, *meta.input_shape), cfg, gen)
            loss = run.optimise(deadline)
            if math.isfinite(loss) and (best is None or loss < best[0]):
                best = (loss, run.inputs(), restart)
        if best is None:
            raise ReconstructionFailed("every restart ended with a non-finite matching loss")
        return Reconstruction(inputs=best[1], labels=labels, matching_loss=best[0],
                              stats={"keylock_attacker": option, "best_restart": best[2],
                                     "locked_layers": len(blocks), "seconds": round(time.perf_counter() - start, 3)})


def recover_labels(model: nn.Module, target: dict[str, Tensor], count: int) -> Tensor:
    """iDLG for one sample, Yin et al.'s rule for `count` distinct labels (from the last Linear layer)."""
    names = {id(p): n for n, p in model.named_parameters()}
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    grad_w = target[names[id(last.weight)]]
    if count == 1 and last.bias is not None:
        return target[names[id(last.bias)]].argmin().reshape(1).long()
    order = torch.argsort(grad_w.min(dim=-1).values)   # classes by their most negative entry (Yin et al.)
    if count > order.numel():  # more samples than classes: labels repeat; cycle through the likeliest
        order = order.repeat(-(-count // order.numel()))
    return torch.sort(order[:count]).values.long()


def _box(meta: TrainMeta) -> tuple[Tensor | None, Tensor | None]:
    if len(meta.input_shape) != 3:
        return None, None
    c = meta.input_shape[0]
    norm = meta.normalization
    lower = norm.from_pixels(torch.zeros(c, 1, 1)) if len(norm.mean) > 1 else norm.from_pixels(torch.zeros(1, 1, 1))
    upper = norm.from_pixels(torch.ones(c, 1, 1)) if len(norm.mean) > 1 else norm.from_pixels(torch.ones(1, 1, 1))
    return lower, upper


class _Run:
    """One restart: inputs plus the option's lock unknowns, optimised with signed Adam."""

    def __init__(self, model, target, labels, blocks, option, lower, upper, shape, cfg, gen) -> None:
        self.model, self.target, self.labels, self.blocks = model, target, labels, blocks
        self.option, self.lower, self.upper, self.cfg = option, lower, upper, cfg
        self.x = torch.randn(shape, generator=gen)
        if lower is not None:
            self.x = torch.maximum(torch.minimum(self.x, upper), lower)
        self.x.requires_grad_(True)
        self.lock_vars: dict[str, list[Tensor]] = {}
        for path, block in blocks.items():
            lock = block.lock
            if option == "regress_key":
                key = torch.rand(lock.key.shape, generator=gen).requires_grad_(True)
                self.lock_vars[path] = [key]
            elif option == "adaptive":
                c = lock.gamma.numel()
                gamma0 = torch.full((c,), 0.5 if lock.act == "sigmoid" else 1.0)
                beta0 = torch.full((c,), 0.5 if lock.act == "sigmoid" else 0.0)
                self.lock_vars[path] = [gamma0.requires_grad_(True), beta0.requires_grad_(True)]
        self.params = dict(model.named_parameters())
        self.buffers = dict(model.named_buffers())
        self.names = list(target)

    def overrides(self) -> dict[str, Tensor]:
        out = {}
        for path, variables in self.lock_vars.items():
            lock = self.blocks[path].lock
            if self.option == "regress_key":
                gamma, beta = lock.outputs(variables[0])
            else:
                gamma, beta = variables
            out[f"{path}.lock.gamma"], out[f"{path}.lock.beta"] = gamma, beta
        return out

    def gradients(self, x: Tensor, create_graph: bool = True) -> dict[str, Tensor]:
        wanted = {n: self.params[n].detach().requires_grad_(True) for n in self.names}
        state = {**{n: p.detach() for n, p in self.params.items()}, **wanted, **self.buffers, **self.overrides()}
        logits = functional_call(self.model, state, (x,))
        loss = F.cross_entropy(logits, self.labels)
        grads = torch.autograd.grad(loss, list(wanted.values()), create_graph=create_graph)
        return dict(zip(self.names, grads))

    def optimise(self, deadline: float) -> float:
        cfg = self.cfg
        groups = [{"params": [self.x], "lr": cfg.lr, "base": cfg.lr}]
        lock_params = [v for vs in self.lock_vars.values() for v in vs]
        if lock_params:
            groups.append({"params": lock_params, "lr": cfg.lock_lr, "base": cfg.lock_lr})
        optimizer = torch.optim.Adam(groups)
        images = self.x.dim() == 4
        buffers0 = {k: v.clone() for k, v in self.buffers.items()}
        for step in range(cfg.iterations):
            if time.perf_counter() >= deadline:
                break
            for group in optimizer.param_groups:
                group["lr"] = group["base"] * 0.1 ** sum(step >= m * cfg.iterations for m in _MILESTONES)
            optimizer.zero_grad()
            loss = cosine_distance(self.gradients(self.x), self.target)
            if images and cfg.tv_weight > 0:
                loss = loss + cfg.tv_weight * total_variation(self.x)
            loss.backward()
            for group in optimizer.param_groups:
                for v in group["params"]:
                    v.grad.sign_()
            optimizer.step()
            with torch.no_grad():
                if self.lower is not None:
                    self.x.copy_(torch.maximum(torch.minimum(self.x, self.upper), self.lower))
                self._project_lock()
                for k, v in buffers0.items():  # train-mode forwards must not drift the running statistics
                    self.buffers[k].copy_(v)
        with torch.enable_grad():
            final = cosine_distance(self.gradients(self.x.detach(), create_graph=False), self.target)
        for k, v in buffers0.items():
            self.buffers[k].copy_(v)
        return float(final.detach())

    def _project_lock(self) -> None:
        if self.option != "adaptive":
            return
        for path, (gamma, beta) in self.lock_vars.items():
            if self.blocks[path].lock.act == "relu":
                gamma.clamp_(min=0.0)
                beta.clamp_(min=0.0)
            else:
                gamma.clamp_(0.0, 1.0)
                beta.clamp_(0.0, 1.0)

    def inputs(self) -> Tensor:
        return self.x.detach().clone()
