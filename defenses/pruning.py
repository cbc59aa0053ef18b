"""Magnitude pruning of the client's update (`defense=pruning`; DLG's "gradient compression").

Keeps the `keep` fraction of coordinates with the largest magnitude and zeroes the rest, either in every tensor
separately (`scope: tensor`, as in DLG/GGL's `gradient_compression`) or over the whole update at once
(`scope: global`, global top-k). A tensor of n entries keeps exactly ceil(keep * n) of them (at least one); ties at
the threshold are broken by position, so the count is exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedsim.defenses.base import Defense, DefenseContext, register_defense
from fedsim.schema import knob

SCOPES = ("tensor", "global")


def kept_count(numel: int, keep: float) -> int:
    """How many of `numel` coordinates survive pruning at `keep`."""
    return min(numel, max(1, math.ceil(keep * numel)))


def prune_tensor(x: Tensor, keep: float) -> Tensor:
    """`x` with all but its ceil(keep * n) largest-magnitude entries set to zero."""
    if x.numel() == 0 or keep >= 1.0:
        return x.clone()
    k = kept_count(x.numel(), keep)
    idx = torch.topk(x.detach().abs().reshape(-1), k, sorted=False).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[idx] = True
    return torch.where(mask.view_as(x), x, torch.zeros_like(x))


def prune(update: Mapping[str, Tensor], keep: float, scope: str = "tensor") -> dict[str, Tensor]:
    """Magnitude pruning of an update: per tensor, or global top-k over all tensors (`scope="global"`)."""
    if scope == "tensor":
        return {k: prune_tensor(v, keep) for k, v in update.items()}
    if scope != "global":
        raise ValueError(f"scope={scope!r}: expected one of {', '.join(SCOPES)}")
    names = list(update)
    flat = torch.cat([update[n].detach().reshape(-1).abs().double() for n in names]) if names else torch.zeros(0)
    if flat.numel() == 0 or keep >= 1.0:
        return {k: v.clone() for k, v in update.items()}
    k = kept_count(flat.numel(), keep)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    out, start = {}, 0
    for n in names:
        v = update[n]
        m = mask[start:start + v.numel()].view_as(v)
        out[n] = torch.where(m, v, torch.zeros_like(v))
        start += v.numel()
    return out


@dataclass(frozen=True)
class PruningConfig:
    keep: float = knob(0.1, gt=0.0, le=1.0, help="fraction of coordinates kept (largest magnitude); 1 keeps all")
    scope: str = knob("tensor", choices=SCOPES, help="tensor: top-k of every tensor; global: top-k of the whole update")


@register_defense("pruning")
class Pruning(Defense):
    """Send only the largest-magnitude `keep` fraction of the update."""

    name = "pruning"
    Config = PruningConfig

    def transform(self, update: Mapping[str, Tensor], ctx: DefenseContext) -> dict[str, Tensor]:
        return prune(update, self.config.keep, self.config.scope)

    def strength(self) -> dict[str, float | str]:
        return {"keep": self.config.keep, "scope": self.config.scope}
