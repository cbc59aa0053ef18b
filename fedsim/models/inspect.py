"""Finding the layer an analytic attack works on: the first parametrised layer of a model, traced with torch.fx."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

# Ops that only reshape the input on its way to the first layer.
_RESHAPES = {torch.flatten, torch.reshape, operator.getitem}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "contiguous"}
_ACTIVATIONS = {
    nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu",
    F.relu: "relu", torch.relu: "relu", torch.sigmoid: "sigmoid", torch.tanh: "tanh", F.gelu: "gelu",
}


@dataclass(frozen=True)
class FirstLayer:
    """The first parametrised module the input reaches, and what consumes its output."""

    name: str                   # module path, e.g. "net.1" (its parameters are "net.1.weight", "net.1.bias")
    module: nn.Module
    input_reshaped_only: bool   # the raw input reaches it through flatten/view/reshape only
    activation: str | None      # "relu", "sigmoid", ... when its output feeds exactly one activation; else None
    next_module: str | None     # type name of what consumes its output (e.g. "ReLU", "BatchNorm1d")


def first_layer(model: nn.Module) -> FirstLayer:
    """Trace `model` and return its first parametrised layer. Raises ValueError if the model cannot be traced."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # models with data-dependent control flow
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx: {err}") from None
    modules = dict(model.named_modules())
    reshaped_only = True
    for node in graph.nodes:
        if node.op == "placeholder" or node.op == "output":
            continue
        if node.op == "call_module":
            module = modules[node.target]
            if any(True for _ in module.parameters(recurse=False)):
                users = list(node.users)
                activation, next_name = None, None
                if len(users) == 1:
                    user = users[0]
                    target = modules[user.target] if user.op == "call_module" else user.target
                    next_name = type(target).__name__ if user.op == "call_module" else getattr(target, "__name__", str(target))
                    activation = _ACTIVATIONS.get(type(target) if user.op == "call_module" else target)
                return FirstLayer(node.target, module, reshaped_only, activation, next_name)
            if not isinstance(module, nn.Flatten):
                reshaped_only = False
        elif node.op == "call_function" and node.target in _RESHAPES:
            continue
        elif node.op == "call_method" and node.target in _RESHAPE_METHODS:
            continue
        else:
            reshaped_only = False
    raise ValueError(f"{type(model).__name__} has no parametrised layer")
