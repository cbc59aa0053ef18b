"""Analytic inversion of a Linear layer for one sample (Phong et al. 2017; Geiping et al. 2020, Sec. 3).

For y = W x + b and a batch of one, dL/dW = (dL/dy) x^T and dL/db = dL/dy, so every row i with dL/db_i != 0 gives
x = dL/dW_i / dL/db_i. Using all rows at once (least squares, x = dW^T db / |db|^2) is exact for b = 1 and
degrades gracefully for b > 1 (a mix of the batch weighted by each sample's output gradient).
"""

from __future__ import annotations

import torch
from torch import nn

from fedsim.attacks.base import Attack, register_attack
from fedsim.errors import AttackNotApplicable
from fedsim.models.inspect import first_layer
from fedsim.threat import Observation, Reconstruction, TrainMeta


def invert_linear(grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> torch.Tensor:
    """The input x (n,) of a Linear layer from its weight (m, n) and bias (m,) gradients, in float64."""
    gw, gb = grad_weight.double(), grad_bias.double()
    denom = gb.dot(gb)
    if denom == 0:
        raise ValueError("the bias gradient is zero: the layer's output did not influence the loss")
    return gw.T @ gb / denom


@register_attack("analytic")
class Analytic(Attack):
    """Recovers the input of the first Linear layer exactly when the client's batch holds one sample."""

    name = "analytic"

    def check(self, model: nn.Module, meta: TrainMeta) -> None:
        super().check(model, meta)
        layer = _first_linear(model)
        if layer.bias is None:
            raise AttackNotApplicable("analytic needs a bias in the first Linear layer")

    def reconstruct(self, obs: Observation) -> Reconstruction:
        name = first_layer(obs.model).name
        grads = obs.gradient()
        x = invert_linear(grads[f"{name}.weight"], grads[f"{name}.bias"])
        return Reconstruction(inputs=x.float().reshape(1, *obs.meta.input_shape))


def _first_linear(model: nn.Module) -> nn.Linear:
    try:
        layer = first_layer(model)
    except ValueError as err:
        raise AttackNotApplicable(f"analytic: {err}") from None
    if not isinstance(layer.module, nn.Linear) or not layer.input_reshaped_only:
        raise AttackNotApplicable(
            f"analytic needs a model whose input goes straight into a Linear layer; "
            f"its first layer is {type(layer.module).__name__} ({layer.name})")
    return layer.module
