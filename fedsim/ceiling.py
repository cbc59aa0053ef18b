"""What an update leaves of its batch, apart from any attack's search: the least-squares ceiling of the first layer.

A FedSGD update of a model whose first layer is Linear + ReLU carries `dW = c G X^T + noise` for that layer:
X the batch (b x n), G (m x b) each sample's output gradient dL/dZ, c <= 1 the clipping factor of the whole update.
An attacker that recovered every column of G exactly (what both of SPEAR's searches look for) would take
`X = argmin ||c G X - dW||`. Under clipping and additive noise that is the unbiased estimate given G, and its score
is the **ceiling**: no attack on this layer's algebra alone does better on average (an image prior could), so
"defense X stops attack Y" can be read against it. When an attack scores far below it, the attack, not the noise,
stopped it (`benchmarks/spear_noise_ceiling.py`: SPEAR at b = 32 under noise sigma 1e-4 gets 20.1 dB, the ceiling
35.5). Under other defenses (pruning zeroes entries) it is what least squares gives that attacker, not a bound.

Scorer-side only: it reads the ground truth (the batch and its labels) to compute G and c, never hands anything
to an attack. It applies to FedSGD updates (a FedAvg update mixes the patterns of several steps) of a model
`first_linear_relu` accepts, with the labels known to the scorer; otherwise `layer_ceiling` returns None.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.attacks.spear.attack import first_linear_relu
from fedsim.errors import AttackNotApplicable
from fedsim.protocol import GroundTruth
from fedsim.threat import TrainMeta


def layer_ceiling(model: nn.Module, update: Mapping[str, Tensor], truth: GroundTruth,
                  meta: TrainMeta) -> Tensor | None:
    """The least-squares reconstruction (b, *input_shape), in model space, with every sample's true output gradient
    of the first Linear + ReLU layer, scaled to the update by a fitted clipping factor; None where it does not apply
    (not FedSGD, no such layer, no labels, or an update the clean gradient does not explain at all)."""
    if meta.mode != "fedsgd" or truth.labels is None or truth.inputs is None:
        return None
    try:
        prefix, layer = first_linear_relu(model)
    except AttackNotApplicable:
        return None
    received = update.get(f"{prefix}.weight")
    if received is None:
        return None
    x = truth.inputs.detach().to(layer.weight.dtype)
    outputs: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: (out.retain_grad(), outputs.append(out))[-1])
    try:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), truth.labels.to(x.device).long()).backward()   # the client's loss: mean CE
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    G = outputs[0].grad.detach().double().T                      # (m, b): each sample's dL/dZ, mean loss
    X = x.flatten(1).double()
    clean = G @ X                                                # (m, n): the layer's clean gradient
    dW = received.detach().double()
    c = float((dW * clean).sum() / (clean * clean).sum().clamp_min(1e-300))
    if not c > 0:
        return None
    estimate = torch.linalg.pinv(c * G) @ dW                     # (b, n): least squares (SVD of the thin G: fast)
    return estimate.reshape(x.shape).to(truth.inputs.dtype)
