"""Local training on a client and evaluation on the server: plain PyTorch, no Flower.

FedSGD: one batch of `batch_size` samples; the update is the gradient of the mean cross-entropy.
FedAvg: `local_steps` SGD steps at `lr`, batches drawn without replacement from the shuffled partition (a new
shuffle each epoch); the update is the new weights (the server sees the delta).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.seeds import seed_for  # noqa: F401  (re-exported: local training's streams)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: the same arithmetic, bit for bit, on every runtime (in-process or Ray actors)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def draw_batches(num_samples: int, batch_size: int, steps: int, gen: torch.Generator) -> list[Tensor]:
    """`steps` batches of indices into a partition: without replacement, reshuffled every epoch."""
    batches, order, pos = [], torch.randperm(num_samples, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > num_samples:
            order, pos = torch.randperm(num_samples, generator=gen), 0
        batches.append(order[pos:pos + batch_size])
        pos += batch_size
    return batches


@dataclass
class LocalResult:
    """What a client computed: `arrays` to send (gradients or weights, plus buffers), and the samples it used."""

    arrays: dict[str, Tensor]
    buffers: list[str]        # keys of `arrays` that are buffers (BatchNorm statistics), not parameters
    num_examples: int
    loss: float
    used: Tensor              # indices into the partition, in order of first use (the ground truth)


def local_update(model: nn.Module, x: Tensor, y: Tensor, *, mode: str, batch_size: int, local_steps: int,
                 lr: float, gen: torch.Generator) -> LocalResult:
    """Train `model` (modified in place) on the partition (x, y) and return what the client sends."""
    model.train()
    steps = 1 if mode == "fedsgd" else local_steps
    batches = draw_batches(len(x), batch_size, steps, gen)
    params = dict(model.named_parameters())
    buffer_names = [name for name, _ in model.named_buffers()]
    losses = []
    if mode == "fedsgd":
        idx = batches[0]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        grads = torch.autograd.grad(loss, list(params.values()))
        arrays = {name: g.detach().clone() for name, g in zip(params, grads)}
        losses.append(loss.item())
        num_examples = len(idx)
    else:
        for idx in batches:
            loss = F.cross_entropy(model(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for p, g in zip(params.values(), grads):
                    p.sub_(lr * g)
            losses.append(loss.item())
        arrays = {name: p.detach().clone() for name, p in params.items()}
        num_examples = len(x)
    arrays.update({name: b.detach().clone() for name, b in model.named_buffers()})
    used = batches[0] if steps == 1 else _first_use(torch.cat(batches))
    return LocalResult(arrays, buffer_names, num_examples, float(np.mean(losses)), used)


def _first_use(indices: Tensor) -> Tensor:
    seen, out = set(), []
    for i in indices.tolist():
        if i not in seen:
            seen.add(i)
            out.append(i)
    return torch.tensor(out, dtype=torch.int64)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on (x, y)."""
    model.eval()
    correct, total_loss = 0, 0.0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return correct / len(x), total_loss / len(x)
