"""The audit mod: a client mod that sends the batch a client trained on to the server's scorer (simulation only).

Add it to an unmodified ClientApp (`ClientApp(mods=[audit_mod])`) and the curious hook can score its
reconstructions against ground truth. It watches the client's own training, without any change to its code:
the inputs of every top-level module called in training mode, and the targets of every cross-entropy / NLL loss
(functional or module). The samples seen (deduplicated) travel in an audit record that the hook strips before
aggregation and never shows to an attack.

Outside a simulation (a real SuperNode) the mod refuses: it sends nothing and warns once, unless the SuperNode's
operator consents (`flower-supernode --node-config "... fedsim-audit=true"`) or it is built with
`make_audit_mod(force=True)`. A server's request alone never makes a real SuperNode send its data.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fedsim.hook import AUDIT_KEY, audit_record

log = logging.getLogger("fedsim")

CONSENT_KEY = "fedsim-audit"  # node config: this node's operator lets its true batches go to the scorer
_LOSSES = {F.cross_entropy: 1, F.nll_loss: 1}  # functional losses -> position of the target argument
_warned = False


def in_simulation() -> bool:
    """True inside fedsim's in-process runtime or a Ray simulation actor; False on a real SuperNode."""
    from fedsim import runtime

    if runtime.INLINE_ACTIVE:
        return True
    ray = sys.modules.get("ray")
    try:
        return bool(ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id())
    except Exception:
        return False


def may_audit(context: Context) -> bool:
    """Whether this node may send its true batch to the scorer: it is simulated (its data belongs to whoever runs
    the simulation), or its operator said so in its node config (`fedsim-audit=true`)."""
    value = context.node_config.get(CONSENT_KEY, False)
    return value is True or str(value).lower() == "true" or in_simulation()


class BatchCapture(TorchFunctionMode):
    """Record, while active, the training inputs of top-level modules and the targets of classification losses."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[Tensor] = []
        self.targets: list[Tensor] = []
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

    def _pre(self, module: nn.Module, args: tuple) -> None:
        if self._depth == 0 and args and isinstance(args[0], Tensor) and torch.is_grad_enabled():
            if isinstance(module, nn.modules.loss._Loss):
                if len(args) > 1 and isinstance(args[1], Tensor):
                    self.targets.append(args[1].detach().clone())
            elif module.training and args[0].is_floating_point():
                self.inputs.append(args[0].detach().clone())
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

    def batch(self) -> tuple[Tensor, Tensor] | None:
        """The distinct samples seen, in order of first use, with their labels (-1 where none was seen)."""
        if not self.inputs:
            return None
        xs, ys, seen = [], [], set()
        for i, x in enumerate(self.inputs):
            y = self.targets[i] if i < len(self.targets) and len(self.targets[i]) == len(x) else None
            for j in range(len(x)):
                key = hashlib.sha1(x[j].cpu().numpy().tobytes()).digest()
                if key in seen:
                    continue
                seen.add(key)
                xs.append(x[j])
                ys.append(int(y[j]) if y is not None and y.dim() == 1 else -1)
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def make_audit_mod(force: bool = False) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """The audit mod; `force=True` sends ground truth even outside a simulation (never do this on real data)."""

    def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        global _warned
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        if not (force or may_audit(context)):
            if not _warned:
                log.warning("fedsim audit mod: not a simulation, so no ground truth is sent (the SuperNode's "
                            "--node-config 'fedsim-audit=true' or make_audit_mod(force=True) overrides this)")
                _warned = True
            return call_next(msg, context)
        with BatchCapture() as capture:
            out = call_next(msg, context)
        batch = capture.batch()
        if batch is not None and not out.has_error():
            out.content[AUDIT_KEY] = audit_record(*batch)
        return out

    return audit_mod


audit_mod = make_audit_mod()
