"""Gradient matching: the shared machinery of optimisation attacks (DLG, Inverting Gradients, GI-SMN-style).

`model_gradients` computes the gradient of the client's loss for candidate inputs through `torch.func`, keeping the
graph so the candidates can be optimised; the distances compare it with the observed gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


def model_gradients(model: nn.Module, inputs: Tensor, labels: Tensor, *, names: list[str] | None = None,
                    create_graph: bool = True) -> dict[str, Tensor]:
    """Gradient of the mean cross-entropy over (inputs, labels) w.r.t. the named parameters of `model`.

    labels: (b,) int64 class indices, or (b, classes) soft labels (probabilities).
    names: which parameters to differentiate (default: all). The model's own parameters are not modified.
    Buffers are used as they are (BatchNorm in the model's current train/eval mode).
    """
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    wanted = {n: params[n].detach().requires_grad_(True) for n in names}
    merged = {**{n: p.detach() for n, p in params.items()}, **wanted}
    logits = functional_call(model, merged, (inputs,))
    loss = cross_entropy(logits, labels)
    grads = torch.autograd.grad(loss, list(wanted.values()), create_graph=create_graph)
    return dict(zip(names, grads))


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy with hard (b,) or soft (b, classes) labels."""
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels)
    return -(labels * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def cosine_distance(candidate: Mapping[str, Tensor], target: Mapping[str, Tensor],
                    mask: Mapping[str, Tensor] | None = None) -> Tensor:
    """1 - <g', g> / (|g'| |g|) over all layers concatenated (Inverting Gradients' 'sim'; one global cosine).

    With `mask` (e.g. `target != 0` for a pruned gradient), the candidate is masked first (GIFD's masked cosine).
    """
    dot = norm_c = norm_t = 0.0
    for name, t in target.items():
        c = _flat(candidate[name], mask, name)
        t = t.reshape(-1)
        # dot products of flat views: no temporaries of the gradient's size (this runs every attack iteration)
        dot = dot + torch.dot(c, t)
        norm_c = norm_c + torch.dot(c, c)
        norm_t = norm_t + torch.dot(t, t)
    return 1.0 - dot / (torch.sqrt(norm_c) * torch.sqrt(torch.as_tensor(norm_t)) + 1e-12)


def euclidean_distance(candidate: Mapping[str, Tensor], target: Mapping[str, Tensor],
                       mask: Mapping[str, Tensor] | None = None) -> Tensor:
    """Sum over layers of the squared L2 distance (DLG)."""
    total = 0.0
    for name, t in target.items():
        diff = _flat(candidate[name], mask, name) - t.reshape(-1)
        total = total + torch.dot(diff, diff)
    return total


def _flat(c: Tensor, mask: Mapping[str, Tensor] | None, name: str) -> Tensor:
    return (c if mask is None else c * mask[name]).reshape(-1)


def total_variation(x: Tensor) -> Tensor:
    """Mean anisotropic total variation of (b, C, H, W) images (Inverting Gradients / breaching)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def nonzero_mask(gradient: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """1 where the observed gradient is non-zero: the structural-zero hint of a pruned gradient."""
    return {k: (v != 0).to(v.dtype) for k, v in gradient.items()}
