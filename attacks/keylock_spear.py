"""SPEAR through the key-lock module (`attack=keylock_spear`): the key-aware variants, and what they can recover.

Under `defense=keylock` the first Linear layer of an FC network is followed by a normalisation and the lock's FiLM
(`defenses/keylock.py`), not by a ReLU, so plain SPEAR (`attack=spear`) refuses the model. What an attacker can
still do depends on the normalisation:

`norm=running` (evaluation-mode normalisation, statistics mu, var from the global model the server sent): the block
is the affine map `Z' = a * (W x + b - mu) + beta` with `a = gamma / sqrt(var + eps)`, i.e. a Linear layer
`W' = diag(a) W`, `b' = a * (b - mu) + beta` followed by the ReLU, whose gradients are `dW' = diag(1/a) dW` and
`db' = db / a`. SPEAR on (W', b', dW', db') recovers the batch exactly; with the true gamma and beta
(`defense.attacker=known_key`) the answer is certified. Without the key, the row scaling does not move the zeros of
the output gradient, so SPEAR still recovers the batch with `ignore_lock=true` (gamma = 1, beta = 0): exact but
uncertified, because the certificate's sign check needs the true W', b'.

`norm=batch` (FedKL; batch statistics while training): the forward pass, hence every gradient, is invariant to
`x_i -> c + t (x_i - mean(x))` for any c and t > 0, and the locked layer's bias gradient is zero: the gradients
alone do not give the batch's mean and contrast. The variant goes as far as the gradients allow: SPEAR on the
*next* Linear+ReLU layer recovers its input, the features `F = ReLU(gamma * h_hat + beta)`, exactly and for any
key; with gamma and beta (known key), every entry with `F > 0` gives `h_hat = (F - beta) / gamma =
W (x_i - mean) / s_j`, a homogeneous linear system in the centred batch and the per-channel scales s_j, solved by
its null vector: the centred batch up to one positive scale. The mean and the scale are then taken from the
block's BatchNorm running statistics the client sent with its update (`attacks/keylock_stats.py`: the batch mean
to ~1e-7 relative error, each channel's batch variance), which needs no key: the output is `mean + t * centred`.
Only when the client keeps its statistics (`fl.send_buffers=false`) is the output the centred batch scaled to unit
variance (mean and contrast unknown; `stats["statistics"] = "none"`). `stats` also record whether the features
were certified and how well the centred batch is determined (`gap`: smallest / next singular value).

Needs `fedsim.attacks.spear` (SPEAR's pure `reconstruct`) and a fedsim FC model (`Sequential` of Flatten, [Linear, ReLU]*,
Linear) whose first Linear is locked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedsim.attacks.base import Attack, register_attack
from fedsim.attacks.keylock_stats import locked_statistics, mean_input, restore_batch
from fedsim.attacks.spear import reconstruct as spear
from fedsim.errors import AttackNotApplicable, ReconstructionFailed
from fedsim.models.keylock import KeyLockBlock
from fedsim.schema import knob
from fedsim.threat import Observation, Reconstruction, TrainMeta


@dataclass(frozen=True)
class KeyLockSpearConfig:
    ignore_lock: bool = knob(False, help="norm=running: use gamma = 1, beta = 0 instead of the attacker's lock "
                                         "(a no-key attacker; exact but uncertified)")
    max_seconds: float | None = knob(300.0, gt=0, help="SPEAR's wall-clock safety net per reconstruction (null: "
                                                       "none; the budget is max_samples)")
    max_samples: int = knob(20_000_000, ge=1, help="SPEAR's budget of sampled row families")
    chunk: int = knob(4096, ge=16, help="SPEAR's submatrices per batched solve (the time budget is checked between)")
    seed: int = knob(0, help="SPEAR's sampling seed")


@register_attack("keylock_spear")
class KeyLockSpear(Attack):
    """SPEAR through a key-lock block: exact (running statistics) or up to mean and contrast (batch statistics)."""

    name = "keylock_spear"
    Config = KeyLockSpearConfig
    requires = frozenset({"batch_size"})

    def check(self, model: nn.Module, meta: TrainMeta) -> None:
        super().check(model, meta)
        _locate(model)

    def reconstruct(self, obs: Observation) -> Reconstruction:
        net, k = _locate(obs.model)
        block = net[k]
        b = int(obs.meta.batch_size)
        grads = {n: v.double() for n, v in obs.gradient().items()}
        prefix = _prefix(obs.model, net)
        gamma, beta = (t.detach().double() for t in block.lock())
        cfg = self.config
        budget = dict(max_seconds=cfg.max_seconds, max_samples=cfg.max_samples, chunk=cfg.chunk, seed=cfg.seed)
        W, bias = block.layer.weight.detach().double(), block.layer.bias.detach().double()
        dW, db = grads[f"{prefix}{k}.layer.weight"], grads[f"{prefix}{k}.layer.bias"]
        stats: dict[str, float | int | bool | str] = {"norm": block.norm_mode,
                                                      "known_key": bool(obs.meta.private.get("keylock.known", False))}
        if block.norm_mode == "running":
            if cfg.ignore_lock:
                gamma, beta = torch.ones_like(gamma), torch.zeros_like(beta)
            mu = block.norm.running_mean.detach().double()
            a = gamma / torch.sqrt(block.norm.running_var.detach().double() + block.norm.eps)
            rows = a.abs() > 1e-12           # a = 0: the channel is constant, its gradient rows carry nothing
            # Only with the client's own gamma and beta is (W', b') the layer: otherwise the sign check fails on the
            # right answer too, and the search stops on its counted rule, not at the budget.
            result = spear((a[:, None] * W)[rows], (a * (bias - mu) + beta)[rows], (dW / a[:, None])[rows],
                           (db / a)[rows], b, layer_known=stats["known_key"] and not cfg.ignore_lock, **budget)
            stats.update(certified_layer="locked", samples=result.samples, seconds=round(result.seconds, 3),
                         stop_reason=result.stop_reason, budget_exhausted=result.budget_exhausted)
            inputs = result.inputs.reshape(result.batch_size, *obs.meta.input_shape).float()
            return Reconstruction(inputs=inputs, certified=result.certified, matching_loss=result.fit_residual,
                                  stats=stats)
        # batch statistics: the features from the next layer, then the lock inverted up to mean and contrast
        nxt = net[k + 2]
        result = spear(nxt.weight.detach().double(), nxt.bias.detach().double(), grads[f"{prefix}{k + 2}.weight"],
                       grads[f"{prefix}{k + 2}.bias"], b, **budget)
        stats.update(features_certified=bool(result.certified), samples=result.samples,
                     seconds=round(result.seconds, 3), stop_reason=result.stop_reason,
                     budget_exhausted=result.budget_exhausted)
        centred, gap = invert_lock(result.inputs, W, gamma, beta)
        stats["gap"] = gap
        found = locked_statistics(obs)
        if found is not None:  # the mean and the contrast from the running statistics the client sent
            _, mean_h, var_h = found
            batch, scale = restore_batch(centred, W, mean_input(W, bias, mean_h), var_h)
            stats.update(statistics="running", scale=scale)
            inputs = batch.reshape(b, *obs.meta.input_shape).float()
        else:
            stats["statistics"] = "none"
            inputs = (centred / centred.std().clamp_min(1e-12)).reshape(b, *obs.meta.input_shape).float()
        return Reconstruction(inputs=inputs, certified=False, matching_loss=result.fit_residual, stats=stats)


def invert_lock(features: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor) -> tuple[Tensor, float]:
    """The centred batch (b, n), up to a positive scale, from the features F (b, m) after a batch-statistics lock.

    Every entry with F > 0 and gamma > 0 gives `W_j (x_i - mean) = s_j (F_ij - beta_j) / gamma_j` with one unknown
    scale s_j > 0 per channel; with `sum_i (x_i - mean) = 0`, the solution is the null vector of one homogeneous
    system. Returns it (scaled so that mean s_j > 0) and the gap: smallest over next-smallest singular value
    (near 0 when the batch is determined up to scale, near 1 when it is not).
    """
    b, _ = features.shape
    m, n = weight.shape
    F_ = features.double()
    alive = (F_ > 1e-6 * F_.abs().max()) & (gamma[None, :] > 1e-9)
    h_hat = (F_ - beta[None, :]) / gamma.clamp_min(1e-12)[None, :]
    ii, jj = torch.nonzero(alive, as_tuple=True)
    channels = torch.unique(jj)
    column = {int(c): b * n + t for t, c in enumerate(channels.tolist())}
    A = torch.zeros(len(ii) + n, b * n + len(channels), dtype=torch.float64)
    eq = torch.arange(len(ii))
    for t in range(len(ii)):
        i, j = int(ii[t]), int(jj[t])
        A[t, i * n:(i + 1) * n] = weight[j]
        A[t, column[j]] = -h_hat[i, j]
    for k in range(n):  # centred: the samples sum to zero in every coordinate
        A[len(eq) + k, torch.arange(b) * n + k] = 1.0
    if A.shape[0] < A.shape[1]:
        raise ReconstructionFailed(f"too few alive features ({len(ii)}) to pin the centred batch "
                                   f"({b * n + len(channels)} unknowns)")
    _, S, Vh = torch.linalg.svd(A, full_matrices=False)
    solution = Vh[-1]
    if solution[b * n:].mean() < 0:
        solution = -solution
    return solution[: b * n].reshape(b, n), float(S[-1] / S[-2])


def _locate(model: nn.Module) -> tuple[nn.Sequential, int]:
    """fedsim's FC layout with a key-lock block: (the Sequential, index of the block). AttackNotApplicable else."""
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            for k, layer in enumerate(module):
                if isinstance(layer, KeyLockBlock):
                    if not isinstance(layer.layer, nn.Linear) or layer.layer.bias is None:
                        raise AttackNotApplicable("keylock_spear needs the locked layer to be a Linear with a bias")
                    if layer.norm_mode == "batch" and not (
                            len(module) > k + 3 and isinstance(module[k + 1], nn.ReLU)
                            and isinstance(module[k + 2], nn.Linear) and isinstance(module[k + 3], nn.ReLU)):
                        raise AttackNotApplicable("keylock_spear with batch statistics needs a Linear+ReLU layer "
                                                  "after the locked one (model=fc with two hidden widths)")
                    relu_next = len(module) > k + 1 and isinstance(module[k + 1], nn.ReLU)
                    if layer.norm_mode == "running" and not relu_next:
                        raise AttackNotApplicable("keylock_spear needs a ReLU after the locked layer")
                    return module, k
    raise AttackNotApplicable("keylock_spear needs a model locked by defense=keylock (model=fc)")


def _prefix(model: nn.Module, net: nn.Sequential) -> str:
    for name, module in model.named_modules():
        if module is net:
            return f"{name}." if name else ""
    return ""
