"""Fault injection (`faults.*`): clients that fail politely (crash, drop out, send NaN/Inf or an array of the
wrong shape) and clients that are hostile or broken in ways a screen must catch:

    dtype        integer, boolean or complex (with NaN) arrays in place of the model's floats
    huge         finite values near the float limit
    examples     a num-examples of NaN, 0, a negative or an absurd (1e15) count
    audit        a malformed audit record
    impersonate  a reply claiming another client's partition
    slow         a reply sent only after `faults.slow_seconds` (a timeout fault when that exceeds fl.timeout)

Which client misbehaves in which round, and how, is drawn from (seed, round, client), so a faulty run is
reproducible. The server detects every fault itself (`fedsim.hook`), records it and leaves the reply out of
aggregation and attacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fedsim.errors import ConfigError, FedsimError
from fedsim.grids import WrappedGrid
from fedsim.schema import build_config, knob, plain
from fedsim.seeds import FAULT_STREAM, seed_for

FAULT_KINDS = ("crash", "dropout", "nan", "shape", "dtype", "huge", "examples", "audit", "impersonate", "slow")


class InjectedCrash(FedsimError, RuntimeError):
    """Raised inside a ClientApp chosen to crash this round."""


@dataclass(frozen=True)
class FaultConfig:
    crash: float = knob(0.0, ge=0.0, le=1.0, help="fraction of clients per round whose training raises")
    dropout: float = knob(0.0, ge=0.0, le=1.0, help="fraction whose reply never arrives")
    nan: float = knob(0.0, ge=0.0, le=1.0, help="fraction that send NaN/Inf values")
    shape: float = knob(0.0, ge=0.0, le=1.0, help="fraction that send an array of the wrong shape")
    dtype: float = knob(0.0, ge=0.0, le=1.0, help="fraction that send integer, boolean or complex-with-NaN arrays")
    huge: float = knob(0.0, ge=0.0, le=1.0, help="fraction that send finite values near the float limit")
    examples: float = knob(0.0, ge=0.0, le=1.0, help="fraction that claim NaN, 0, negative or absurd num-examples")
    audit: float = knob(0.0, ge=0.0, le=1.0, help="fraction that send a malformed audit record")
    impersonate: float = knob(0.0, ge=0.0, le=1.0, help="fraction whose reply claims another client's partition")
    slow: float = knob(0.0, ge=0.0, le=1.0, help="fraction that reply only after faults.slow_seconds")
    slow_seconds: float = knob(60.0, ge=0.0, help="how long a slow client waits before replying")

    @property
    def total(self) -> float:
        return sum(getattr(self, kind) for kind in FAULT_KINDS)

    @property
    def any(self) -> bool:
        return self.total > 0


def fault_config(node) -> FaultConfig:
    cfg = build_config(FaultConfig, plain(node) or {}, "faults")
    total = cfg.total
    if total > 1.0:
        raise ConfigError("faults", {k: getattr(cfg, k) for k in FAULT_KINDS}, "fractions that sum to at most 1")
    return cfg


def draw_fault(cfg: FaultConfig, seed: int, server_round: int, client: int) -> str | None:
    """The fault (if any) of `client` in `server_round`: one uniform draw against the cumulative fractions."""
    if not cfg.any:
        return None
    u = torch.rand(1, generator=torch.Generator().manual_seed(seed_for(seed, server_round, client, FAULT_STREAM))).item()
    edge = 0.0
    for kind in FAULT_KINDS:
        edge += getattr(cfg, kind)
        if u < edge:
            return kind
    return None


def variant(seed: int, server_round: int, client: int, count: int) -> int:
    """Which of `count` forms a fault takes (a second draw from the same stream as `draw_fault`)."""
    gen = torch.Generator().manual_seed(seed_for(seed, server_round, client, FAULT_STREAM))
    return int(torch.rand(2, generator=gen)[1].item() * count)


DTYPE_FORMS = ("int", "bool", "complex")
BAD_EXAMPLES = (float("nan"), 0, -8, 1e15)


def corrupt(arrays: Mapping[str, torch.Tensor], kind: str, form: int = 0) -> dict[str, torch.Tensor]:
    """The arrays a faulty client sends: NaN and Inf planted in every tensor, one tensor cut short, floats turned
    into DTYPE_FORMS[form] (complex ones holding NaN), or finite values near the float limit."""
    out = {k: v.clone() for k, v in arrays.items()}
    first = next(k for k, v in out.items() if v.is_floating_point() and v.numel() > 1)
    if kind == "nan":
        for v in out.values():
            if v.is_floating_point() and v.numel() > 0:
                v.view(-1)[0] = float("nan")
                v.view(-1)[-1] = float("inf")
    elif kind == "shape":
        out[first] = out[first].reshape(-1)[:-1].clone()
    elif kind == "dtype":
        for name, v in out.items():
            if not v.is_floating_point():
                continue
            if DTYPE_FORMS[form] == "int":
                out[name] = v.round().to(torch.int32)
            elif DTYPE_FORMS[form] == "bool":
                out[name] = v > 0
            else:
                z = v.to(torch.complex64)
                z.view(-1)[0] = complex(float("nan"), 0.0)
                out[name] = z
    elif kind == "huge":
        for v in out.values():
            if v.is_floating_point():
                v.copy_(torch.sign(v) * torch.finfo(v.dtype).max / 4 + (v == 0) * torch.finfo(v.dtype).max / 4)
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
