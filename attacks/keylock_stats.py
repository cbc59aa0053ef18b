"""The batch mean and contrast from a key-lock block's BatchNorm statistics (`attack=keylock_stats`).

With `defense=keylock norm=batch` the gradients are blind to the batch's mean and contrast (`defenses/keylock.py`),
but the client also sends the block's running statistics, and those were updated from the very batch it trained
on. For a locked Linear layer `h = W x + b` (W: (m, n)) and BatchNorm momentum `mom`, one training step (FedSGD)
gives

    running_mean_new = (1 - mom) running_mean_old + mom * mean_i(W x_i + b)
    running_var_new  = (1 - mom) running_var_old  + mom * var_i(W x_i + b)     (unbiased, per channel)

The server sent `running_*_old` (the global model's buffers) and receives `running_*_new`, so

    mean_i(h_i) = (running_mean_new - (1 - mom) running_mean_old) / mom,   xbar = lstsq(W, mean_i(h_i) - b)

is the batch mean (exact up to float32 rounding when W has full column rank, m >= n), and
`v_j = W_j Cov(x) W_j^T` is each channel's batch variance: the contrast. Neither needs the key: the statistics
sit before the lock's gamma and beta. Measured (tests/test_keylock_stats.py, digits, fc widths [256, 256], batch
8, FedSGD, defaults otherwise): relative error of the batch mean ~1e-7.

With the centred batch known up to one positive scale t (what `keylock_spear` gets through the lock), the
variances fix t: `v_j = t^2 var_i(W_j c_i)`, so the batch is `xbar + t c_i` (`restore_batch`).

FedAvg with T local steps mixes T batches through T different weights:
`running_mean_T = (1 - mom)^T running_mean_0 + mom sum_t (1 - mom)^(T-1-t) mean(W_t x + b_t)`. The estimate then
solves with the global W, b and the normalised weights: a weighted mean of the step batches' means, exact only in
the limit of small steps (`stats["exact_model"] = False`). Measured on the same digits batch of 8, lr 0.1: relative
error 4.4e-3 after 4 local steps, 1.8e-2 after 10 (one step: 6.5e-8).

The attack returns the batch mean as a one-sample reconstruction (model space); `stats` records the channel
variances' mean and the rank of W.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedsim.attacks.base import Attack, register_attack
from fedsim.errors import AttackNotApplicable, ReconstructionFailed
from fedsim.models.keylock import lock_blocks
from fedsim.threat import Observation, Reconstruction, TrainMeta

# --- pure functions ------------------------------------------------------------------------------------------------

def batch_statistic(old: Tensor, new: Tensor, momentum: float, steps: int = 1) -> Tensor:
    """The (weighted) batch statistic behind a running statistic's move: (new - (1-m)^T old) / (1 - (1-m)^T).

    For one step (T = 1) this is exactly the batch's mean (or unbiased variance) of each channel. float64.
    """
    keep = (1.0 - momentum) ** steps
    return (new.double() - keep * old.double()) / (1.0 - keep)


def mean_input(weight: Tensor, bias: Tensor | None, mean_output: Tensor) -> Tensor:
    """xbar with `W xbar + b = mean_output`, in the least-squares sense. weight: (m, n); returns (n,) float64."""
    rhs = mean_output.double() - (bias.detach().double() if bias is not None else 0.0)
    return torch.linalg.lstsq(weight.detach().double(), rhs[:, None], driver="gelsd").solution[:, 0]


def restore_batch(centred: Tensor, weight: Tensor, mean: Tensor, channel_var: Tensor) -> tuple[Tensor, float]:
    """The batch from its centred form known up to a positive scale: `mean + t * centred`, t fitted so that each
    channel's batch variance matches `channel_var` (least squares over channels in t^2). centred: (b, n)."""
    c = centred.double()
    fitted = (c @ weight.double().T).var(dim=0, unbiased=True)
    t2 = float((fitted * channel_var.double()).sum() / fitted.pow(2).sum().clamp_min(1e-300))
    if t2 <= 0:
        raise ReconstructionFailed("the channel variances give no positive scale for the centred batch")
    t = t2 ** 0.5
    return mean.double()[None, :] + t * c, t


# --- the attack -----------------------------------------------------------------------------------------------------

def locked_statistics(obs: Observation) -> tuple[nn.Module, Tensor, Tensor] | None:
    """(block, batch mean of h, batch variance of h) of the first key-lock block, from the buffers the client sent
    and those of the global model; None when the client sent none (fl.send_buffers=false)."""
    blocks = lock_blocks(obs.model)
    if not blocks:
        return None
    path, block = next(iter(blocks.items()))
    names = (f"{path}.norm.running_mean", f"{path}.norm.running_var")
    if not all(n in obs.buffers for n in names):
        return None
    steps = 1 if obs.meta.mode == "fedsgd" else (obs.meta.local_steps or 1)
    m = float(block.norm.momentum)
    mean_h = batch_statistic(block.norm.running_mean, obs.buffers[names[0]], m, steps)
    var_h = batch_statistic(block.norm.running_var, obs.buffers[names[1]], m, steps)
    return block, mean_h, var_h


@register_attack("keylock_stats")
class KeyLockStats(Attack):
    """The batch mean (and each channel's variance) from a key-lock block's running statistics, without the key."""

    name = "keylock_stats"

    def check(self, model: nn.Module, meta: TrainMeta) -> None:
        super().check(model, meta)
        blocks = lock_blocks(model)
        if not blocks:
            raise AttackNotApplicable("keylock_stats needs a model locked by defense=keylock")
        block = next(iter(blocks.values()))
        if not isinstance(block.layer, nn.Linear):
            raise AttackNotApplicable("keylock_stats needs the locked layer to be a Linear (model=fc); a Conv2d's "
                                      "statistics average over positions, which this attack does not invert")

    def reconstruct(self, obs: Observation) -> Reconstruction:
        found = locked_statistics(obs)
        if found is None:
            raise ReconstructionFailed("the client sent no statistics of the locked block (fl.send_buffers=false)")
        block, mean_h, var_h = found
        W = block.layer.weight.detach()
        xbar = mean_input(W, block.layer.bias, mean_h)
        stats: Mapping[str, float | int | bool | str] = {
            "estimate": "batch mean", "rank": int(torch.linalg.matrix_rank(W.double())),
            "channel_var_mean": float(var_h.mean()),
            "exact_model": obs.meta.mode == "fedsgd" or obs.meta.local_steps == 1}
        return Reconstruction(inputs=xbar.float().reshape(1, *obs.meta.input_shape), stats=dict(stats))
