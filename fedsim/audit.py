"""The audit mod: a client mod that sends the batch a client trained on to the server's scorer (simulation only).

Add it to an unmodified ClientApp (`ClientApp(mods=[audit_mod])`) and the curious hook can score its
reconstructions against ground truth. It finds the samples in one of two ways:

* automatically: the tensors that enter the model the client trains (the module whose parameters are the arrays
  it replies with), in training mode, and the targets of its cross-entropy / NLL losses. Modules without
  parameters, such as torchvision's `Normalize` applied by a DataLoader, are never taken for the model;
* explicitly: the client calls `fedsim.audit.capture(x, y)` on each batch it trains on (a no-op outside the mod).
  Once a client calls it, only what it passes is sent.

The samples seen (deduplicated) travel in an audit record that the hook strips before aggregation and never shows
to an attack. Capturing never stops training: when it fails, the reply goes out as the client made it, and the
audit record carries the reason instead of the batch (the server records an `audit` fault naming the client).

Outside a simulation (a real SuperNode) the mod refuses: it sends nothing and warns once, unless the SuperNode's
operator consents (`flower-supernode --node-config "... fedsim-audit=true"`) or it is built with
`make_audit_mod(force=True)`. A server's request alone never makes a real SuperNode send its data.
"""

from __future__ import annotations

import hashlib
import logging
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fedsim.arrays import to_numpy
from fedsim.protocol import AUDIT_KEY, CONSENT_KEY, audit_record, in_simulation, may_audit  # noqa: F401  (re-exported)

log = logging.getLogger("fedsim")
_LOSSES = {F.cross_entropy: 1, F.nll_loss: 1}  # functional losses -> position of the target argument
_warned = False
_active: BatchCapture | None = None  # the capture of the train message being handled (ClientApps run one at a time)


class CaptureFailed(RuntimeError):
    """The client's batch could not be taken from its training (the reason says why)."""


def capture(inputs: Tensor, labels: Tensor | None = None) -> None:
    """Send this batch to the scorer: call it in the training loop on each batch, as the model receives it.

    inputs: (b, *shape), the model's input (after the app's transforms); labels: (b,) int class labels or None.
    Does nothing unless the audit mod handles the current message, so it can stay in the app's code.
    """
    if _active is not None:
        _active.add_explicit(inputs, labels)


class BatchCapture(TorchFunctionMode):
    """While active, record what enters each top-level module called in training mode (with its module) and the
    targets of classification losses; `batch` later keeps the inputs of the model the client trained."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[nn.Module, Tensor]] = []
        self.targets: list[Tensor] = []
        self.explicit: list[tuple[Tensor, Tensor | None]] = []
        self.failure: str | None = None      # a hook that failed while training ran (training went on)
        self._depth = 0
        self._handles: list = []

    def __enter__(self):
        self._handles = [nn.modules.module.register_module_forward_pre_hook(self._pre),
                         nn.modules.module.register_module_forward_hook(self._post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return super().__exit__(*exc)

    def add_explicit(self, inputs: Tensor, labels: Tensor | None) -> None:
        self.explicit.append((inputs.detach().clone(), None if labels is None else labels.detach().clone()))

    def _pre(self, module: nn.Module, args: tuple) -> None:
        try:
            if self._depth == 0 and args and isinstance(args[0], Tensor) and torch.is_grad_enabled():
                if isinstance(module, nn.modules.loss._Loss):
                    if len(args) > 1 and isinstance(args[1], Tensor):
                        self.targets.append(args[1].detach().clone())
                elif module.training and args[0].is_floating_point() and next(module.parameters(), None) is not None:
                    self.calls.append((module, args[0].detach().clone()))
        except Exception as err:  # capturing must never break the client's training
            self.failure = self.failure or f"{type(err).__name__}: {err}"
        self._depth += 1

    def _post(self, module: nn.Module, args: tuple, output) -> None:
        self._depth -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        position = _LOSSES.get(func)
        if position is not None and self._depth == 0 and torch.is_grad_enabled():
            target = kwargs.get("target", args[position] if len(args) > position else None)
            if isinstance(target, Tensor):
                self.targets.append(target.detach().clone())
        return func(*args, **kwargs)

    def batch(self, sent: ArrayRecord | None = None) -> tuple[Tensor, Tensor]:
        """The distinct samples trained on, in order of first use, with their labels (-1 where none was seen).

        sent: the arrays the client replied with; the model they belong to is the one whose inputs are kept.
        Raises `CaptureFailed` (with the reason) when there is nothing usable.
        """
        if self.explicit:
            return _distinct([x for x, _ in self.explicit], [y for _, y in self.explicit])
        if not self.calls:
            raise CaptureFailed("no module with parameters ran forward in training mode during the train message; "
                                "call fedsim.audit.capture(x, y) in the training loop")
        model = _trained_model([m for m, _ in self.calls], sent)
        inputs = [x for m, x in self.calls if m is model]
        targets = self.targets if len(self.targets) == len(inputs) else [None] * len(inputs)
        return _distinct(inputs, targets)


def _trained_model(modules: list[nn.Module], sent: ArrayRecord | None) -> nn.Module:
    """The module the client trained: the one whose state (or parameters) has the reply's names or shapes;
    failing that, the one with the most parameters."""
    distinct = list({id(m): m for m in modules}.values())
    if sent is not None:
        names = list(sent.keys())
        shapes = [tuple(to_numpy(a).shape) for a in sent.values()]
        for m in distinct:
            state = m.state_dict()
            if set(state) == set(names) or [tuple(v.shape) for v in state.values()] == shapes or \
                    [tuple(p.shape) for p in m.parameters()] == shapes:
                return m
    return max(distinct, key=lambda m: sum(p.numel() for p in m.parameters()))


def _distinct(inputs: list[Tensor], targets: list[Tensor | None]) -> tuple[Tensor, Tensor]:
    shapes = {tuple(x.shape[1:]) for x in inputs}
    if len(shapes) != 1:
        raise CaptureFailed(f"the model's inputs changed shape during training ({sorted(shapes)}); "
                            "call fedsim.audit.capture(x, y) on the batches it trains on")
    xs, ys, seen = [], [], set()
    for x, y in zip(inputs, targets):
        usable = y is not None and y.dim() == 1 and len(y) == len(x)
        for j in range(len(x)):
            key = hashlib.sha1(x[j].cpu().contiguous().numpy().tobytes()).digest()
            if key in seen:
                continue
            seen.add(key)
            xs.append(x[j])
            ys.append(int(y[j]) if usable else -1)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def make_audit_mod(force: bool = False) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """The audit mod; `force=True` sends ground truth even outside a simulation (never do this on real data)."""

    def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        global _warned, _active
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        if not (force or may_audit(context)):
            if not _warned:
                log.warning("fedsim audit mod: not a simulation, so no ground truth is sent (the SuperNode's "
                            "--node-config 'fedsim-audit=true' or make_audit_mod(force=True) overrides this)")
                _warned = True
            return call_next(msg, context)
        with BatchCapture() as batch_capture:
            _active = batch_capture
            try:
                out = call_next(msg, context)
            finally:
                _active = None
        if out.has_error():
            return out
        client = {"partition-id": int(context.node_config["partition-id"])} \
            if "partition-id" in context.node_config else {}
        try:
            if batch_capture.failure is not None:
                raise CaptureFailed(f"a capture hook failed: {batch_capture.failure}")
            arrays = next(iter(out.content.array_records.values()), None)
            record = audit_record(*batch_capture.batch(arrays))
        except Exception as err:  # the client trained: its reply goes out, with the reason instead of the batch
            reason = "".join(traceback.format_exception_only(type(err), err)).strip()
            log.warning("fedsim audit mod: no ground truth from client %s: %s", client.get("partition-id"), reason)
            record = ConfigRecord({"error": reason})
        for key, value in client.items():
            record[key] = value
        out.content[AUDIT_KEY] = record
        return out

    return audit_mod


audit_mod = make_audit_mod()
