"""Fault injection (`faults.*`): clients that crash, drop out, send NaN/Inf or send arrays of the wrong shape.

Which client misbehaves in which round is drawn from (seed, round, client), so a faulty run is reproducible. The
server detects every fault itself (`fedsim.hook`), records it and leaves the reply out of aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fedsim.grids import WrappedGrid

from fedsim.config import _plain, build_config, knob
from fedsim.errors import ConfigError, FedsimError
from fedsim.training import seed_for

FAULT_KINDS = ("crash", "dropout", "nan", "shape")
_STREAM = 0xFA17  # separates the fault draw from every other random stream of (seed, round, client)


class InjectedCrash(FedsimError, RuntimeError):
    """Raised inside a ClientApp chosen to crash this round."""


@dataclass(frozen=True)
class FaultConfig:
    crash: float = knob(0.0, ge=0.0, le=1.0, help="fraction of clients per round whose training raises")
    dropout: float = knob(0.0, ge=0.0, le=1.0, help="fraction whose reply never arrives")
    nan: float = knob(0.0, ge=0.0, le=1.0, help="fraction that send NaN/Inf values")
    shape: float = knob(0.0, ge=0.0, le=1.0, help="fraction that send an array of the wrong shape")

    @property
    def any(self) -> bool:
        return self.crash + self.dropout + self.nan + self.shape > 0


def fault_config(node) -> FaultConfig:
    cfg = build_config(FaultConfig, _plain(node) or {}, "faults")
    total = cfg.crash + cfg.dropout + cfg.nan + cfg.shape
    if total > 1.0:
        raise ConfigError("faults", {k: getattr(cfg, k) for k in FAULT_KINDS}, "fractions that sum to at most 1")
    return cfg


def draw_fault(cfg: FaultConfig, seed: int, server_round: int, client: int) -> str | None:
    """The fault (if any) of `client` in `server_round`: one uniform draw against the cumulative fractions."""
    if not cfg.any:
        return None
    u = torch.rand(1, generator=torch.Generator().manual_seed(seed_for(seed, server_round, client, _STREAM))).item()
    edge = 0.0
    for kind in FAULT_KINDS:
        edge += getattr(cfg, kind)
        if u < edge:
            return kind
    return None


def corrupt(arrays: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The arrays a faulty client sends: NaN and Inf planted in every tensor, or one tensor cut short."""
    out = {k: v.clone() for k, v in arrays.items()}
    first = next(k for k, v in out.items() if v.is_floating_point() and v.numel() > 1)
    if kind == "nan":
        for v in out.values():
            if v.is_floating_point() and v.numel() > 0:
                v.view(-1)[0] = float("nan")
                v.view(-1)[-1] = float("inf")
    elif kind == "shape":
        out[first] = out[first].reshape(-1)[:-1].clone()
    return out


class LossyGrid(WrappedGrid):
    """A Grid that loses the replies of the clients drawn to drop out (the server just never hears back).

    Wraps any Grid (in-process, Ray simulation, deployment), so dropouts look the same on every runtime.
    """

    def __init__(self, inner: Grid, cfg: FaultConfig, seed: int, partition_of: Mapping[int, int]) -> None:
        super().__init__(inner)
        self.cfg, self.seed, self.partition_of = cfg, seed, partition_of

    def on_replies(self, replies: Iterable[Message]) -> list[Message]:
        kept = []
        for reply in replies:
            client = self.partition_of.get(reply.metadata.src_node_id)
            group = reply.metadata.group_id
            if (client is not None and group.isdigit() and reply.metadata.message_type == "train"
                    and draw_fault(self.cfg, self.seed, int(group), client) == "dropout"):
                continue
            kept.append(reply)
        return kept
