"""Analytic label recovery from the gradient of the last Linear layer (iDLG, Yin et al., LLG).

For cross-entropy over softmax logits `z = W h + bias`, the gradient of one sample's loss is
`dL/dW[m, :] = (p_m - y_m) h^T` and `dL/dbias[m] = p_m - y_m`, with `p = softmax(z)` and `y` one-hot. Only the true
class has `p_m - y_m < 0`. When the features `h` are non-negative (after ReLU or sigmoid), the sign of a row of
`dL/dW` tells whether its class is present; the methods below turn this into labels for a batch of `b` samples
whose gradient is averaged.

- iDLG (Zhao, Mopuri, Bilen 2020, sec. 3): b = 1, the class whose row (or bias entry) is negative. Exact.
- Yin et al. ("See through Gradients", CVPR 2021, sec. 3.1): b distinct labels, the b classes whose rows have the
  most negative minimum entry. Exact for distinct labels and non-negative features.
- LLG (Wainakh et al., PETS 2022, alg. 1 "LLG"): repeated labels. Classes with a negative row sum are taken once,
  then the class with the smallest row sum is taken repeatedly, each take adding back one sample's estimated impact.

`recover_labels` is the pure entry point; `LabelRecovery` (registered as `labels`) scores label recovery alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedsim.attacks.base import Attack, register_attack
from fedsim.errors import AttackNotApplicable
from fedsim.schema import knob
from fedsim.threat import Observation, Reconstruction, TrainMeta

LABEL_METHODS = ("auto", "idlg", "yin", "llg")


def idlg_labels(grad_weight: Tensor, grad_bias: Tensor | None = None) -> Tensor:
    """iDLG: the label of a single sample.

    grad_weight: (classes, features) gradient of the last Linear layer's weight; grad_bias: (classes,) or None.
    Returns (1,) int64. Uses the bias gradient when there is one (its only negative entry is the true class, for
    any features); otherwise the row sums of the weight gradient, as in the iDLG paper (needs features >= 0).
    """
    score = grad_bias if grad_bias is not None else grad_weight.sum(dim=-1)
    return score.argmin().reshape(1).to(torch.int64)


def yin_labels(grad_weight: Tensor, batch_size: int) -> Tensor:
    """Yin et al.: `batch_size` distinct labels, those whose weight-gradient row has the most negative entry.

    grad_weight: (classes, features). Returns (batch_size,) int64, sorted. Needs batch_size <= classes.
    """
    classes = grad_weight.shape[0]
    if batch_size > classes:
        raise ValueError(f"Yin's label recovery returns distinct labels: batch_size={batch_size} > classes={classes}")
    row_min = grad_weight.min(dim=-1).values
    return torch.sort(torch.argsort(row_min)[:batch_size]).values.to(torch.int64)


def llg_labels(grad_weight: Tensor, batch_size: int) -> Tensor:
    """LLG (Wainakh et al. 2022): `batch_size` labels, repetitions allowed.

    grad_weight: (classes, features). Returns (batch_size,) int64, sorted.
    With `s_m = sum_k grad_weight[m, k]`: every class with `s_m < 0` is a label (stage 1, at most batch_size of them,
    most negative first); the impact of one sample is `I = (sum_{s_m<0} s_m / b) (1 + 1/classes)`. Each extracted
    class gets `s_m -= I`; then until b labels are found, `argmin s` is appended and its `s -= I` (stage 2).
    """
    classes = grad_weight.shape[0]
    sums = grad_weight.sum(dim=-1).to(torch.float64)
    negative = torch.nonzero(sums < 0).flatten()
    negative = negative[torch.argsort(sums[negative])][:batch_size]
    if len(negative) == 0:  # no negative row (e.g. a trained net with p ~ y): guess a typical impact, same sign
        impact = -sums.abs().mean() / batch_size
    else:
        impact = sums[negative].sum() / batch_size * (1.0 + 1.0 / classes)
    labels = negative.tolist()
    sums[negative] -= impact
    while len(labels) < batch_size:
        best = int(torch.argmin(sums))
        labels.append(best)
        sums[best] -= impact
    return torch.sort(torch.tensor(labels, dtype=torch.int64)).values


def recover_labels(grad_weight_last: Tensor, grad_bias_last: Tensor | None, batch_size: int,
                   method: str = "auto") -> Tensor:
    """Labels of a batch from the last Linear layer's gradient.

    grad_weight_last: (classes, features); grad_bias_last: (classes,) or None; batch_size: samples averaged into the
    gradient. method: "idlg" (b = 1), "yin" (distinct labels), "llg" (repeated labels) or "auto" (iDLG for b = 1,
    LLG otherwise, since the attacker cannot know whether labels repeat).
    Returns (batch_size,) int64, sorted.
    """
    if method not in _METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(LABEL_METHODS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    return _METHODS[method](grad_weight_last.detach(), None if grad_bias_last is None else grad_bias_last.detach(),
                            batch_size)


def _idlg(w: Tensor, b: Tensor | None, batch_size: int) -> Tensor:
    if batch_size != 1:
        raise ValueError(f"iDLG recovers the label of one sample: batch_size={batch_size}")
    return idlg_labels(w, b)


_METHODS: dict[str, Callable[[Tensor, Tensor | None, int], Tensor]] = {
    "auto": lambda w, b, n: idlg_labels(w, b) if n == 1 else llg_labels(w, n),
    "idlg": _idlg,
    "yin": lambda w, b, n: yin_labels(w, n),
    "llg": lambda w, b, n: llg_labels(w, n),
}


@dataclass(frozen=True)
class LastLinear:
    """Names of the classification layer's parameters (as in `model.named_parameters()`)."""

    weight: str
    bias: str | None


def find_last_linear(model: nn.Module, input_shape: tuple[int, ...]) -> LastLinear:
    """The Linear layer whose output is the model's output (the logits), found by tracing one forward pass.

    input_shape: one sample's shape. Raises `AttackNotApplicable` when the logits do not come straight out of an
    `nn.Linear` (the label-recovery algebra above needs `z = W h + bias`).
    """
    outputs: dict[str, Tensor] = {}
    hooks = [module.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, out))
             for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    try:
        param = next(model.parameters())
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(torch.zeros((1, *input_shape), dtype=param.dtype, device=param.device))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    for name, out in outputs.items():
        if out is logits:
            module = model.get_submodule(name)
            prefix = f"{name}." if name else ""
            return LastLinear(prefix + "weight", prefix + "bias" if module.bias is not None else None)
    raise AttackNotApplicable("label recovery needs a model whose logits are the output of an nn.Linear layer")


def last_layer_gradient(model: nn.Module, gradient: Mapping[str, Tensor],
                        input_shape: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    """(grad_weight (classes, features), grad_bias (classes,) or None) of the last Linear layer in `gradient`."""
    layer = find_last_linear(model, input_shape)
    if layer.weight not in gradient:
        raise AttackNotApplicable(f"the update holds no gradient for the last layer ({layer.weight})")
    return gradient[layer.weight], gradient.get(layer.bias) if layer.bias is not None else None


def samples_in_update(meta: TrainMeta) -> int | None:
    """How many distinct samples one client update mixes, as far as the threat model tells.

    FedSGD: the batch size. FedAvg: `meta.distinct_samples` when the threat model gives it (epochs over the same
    data), else the samples touched by `local_steps` steps of `batch_size` over the client's `num_examples` (the
    client cycles through its data), i.e. min(num_examples, batch_size * local_steps).
    """
    if meta.labels is not None:
        return int(meta.labels.numel())
    if meta.mode == "fedavg" and meta.distinct_samples is not None:
        return meta.distinct_samples
    if meta.batch_size is None:
        return None
    if meta.mode == "fedavg":
        touched = meta.batch_size * (meta.local_steps or 1)
        return min(meta.num_examples, touched) if meta.num_examples else touched
    return meta.batch_size


@dataclass(frozen=True)
class LabelRecoveryConfig:
    method: str = knob("auto", choices=LABEL_METHODS,
                       help="idlg (b = 1), yin (distinct labels), llg (repeats), auto: idlg if b = 1 else llg")


@register_attack("labels")
class LabelRecovery(Attack):
    """Analytic label recovery alone: `Reconstruction(inputs=None, labels=...)`, for scoring label accuracy."""

    name = "labels"
    Config = LabelRecoveryConfig
    requires = frozenset({"batch_size"})

    def check(self, model: nn.Module, meta: TrainMeta) -> None:
        if meta.labels is None:
            super().check(model, meta)
        find_last_linear(model, meta.input_shape)

    def reconstruct(self, obs: Observation) -> Reconstruction:
        if obs.meta.labels is not None:  # granted by the threat model: nothing to recover
            return Reconstruction(inputs=None, labels=torch.sort(obs.meta.labels.long()).values,
                                  stats={"label_method": "granted"})
        count = samples_in_update(obs.meta)
        if count is None:
            raise AttackNotApplicable("label recovery needs the batch size")
        grad_w, grad_b = last_layer_gradient(obs.model, _as_gradient(obs), obs.meta.input_shape)
        labels = recover_labels(grad_w, grad_b, count, self.config.method)
        return Reconstruction(inputs=None, labels=labels, stats={"label_method": self.config.method})


def _as_gradient(obs: Observation) -> dict[str, Tensor]:
    """The update as a gradient. A FedAvg delta is -lr * (sum of step gradients); without lr, -delta keeps its signs,
    which is all the label methods use (they are invariant to a positive scale)."""
    if obs.meta.mode == "fedavg" and obs.meta.lr is None:
        return {k: -v for k, v in obs.update.items()}
    return obs.gradient()
