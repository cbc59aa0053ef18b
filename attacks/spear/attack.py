"""The fedsim adapter: SPEAR as an `Attack` on an `Observation` (the model's first Linear+ReLU layer)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.attacks.base import Attack, register_attack
from fedsim.schema import knob
from fedsim.errors import AttackNotApplicable, ConfigError
from fedsim.threat import Observation, Reconstruction, TrainMeta

from fedsim.attacks.spear.factorisation import _CERT_SAFETY, _EXACT
from fedsim.attacks.spear.solve import reconstruct


# --- the attack -------------------------------------------------------------------------------------------------------

_PASS_THROUGH = (nn.Flatten, nn.Identity, nn.Dropout)


def first_linear_relu(model: nn.Module) -> tuple[str, nn.Linear]:
    """The layer SPEAR attacks: the model's first parametrised layer, which must be nn.Linear followed by ReLU.

    Returns (parameter-name prefix, layer), e.g. ("net.1", Linear): its gradients are `prefix + ".weight"` and
    `prefix + ".bias"`. The order is the execution order from torch.fx when the model traces, else the modules'
    registration order (which is the execution order of nn.Sequential stacks). Only Flatten/Identity/Dropout (or a
    flatten/reshape/view) may come before the layer. Raises AttackNotApplicable, one line, otherwise.
    """
    try:
        order = _traced_leaves(torch.fx.symbolic_trace(model))
    except Exception:  # noqa: BLE001 - any tracing failure falls back to the registration order
        order = [(name, mod) for name, mod in model.named_modules() if not list(mod.children())]
    for pos, (name, mod) in enumerate(order):
        if mod is None or not list(mod.parameters(recurse=False)):
            if mod is None or isinstance(mod, _PASS_THROUGH):
                continue
            raise AttackNotApplicable(f"spear attacks the first layer, but {type(mod).__name__} ('{name}') comes "
                                      "before any Linear layer")
        if not isinstance(mod, nn.Linear):
            raise AttackNotApplicable(f"spear needs the first parametrised layer to be Linear followed by ReLU, "
                                      f"got {type(mod).__name__} ('{name}')")
        after = next((m for _, m in order[pos + 1:] if not isinstance(m, (nn.Identity, nn.Dropout))), None)
        if not (isinstance(after, nn.ReLU) or after is _RELU):
            got = "nothing" if after is None else "a function" if not isinstance(after, nn.Module) else type(after).__name__
            raise AttackNotApplicable(f"spear needs ReLU right after the first Linear layer ('{name}'), got {got}")
        if mod.bias is None:
            raise AttackNotApplicable(f"spear needs a bias on the first Linear layer ('{name}'): without it the "
                                      "samples' scales are not identifiable")
        return name, mod
    raise AttackNotApplicable("spear found no parametrised layer in the model")


_RELU = object()  # marks a functional relu (F.relu, torch.relu, x.relu()) in a traced graph
_SHAPE_OPS = {"flatten", "reshape", "view", "contiguous"}


def _traced_leaves(graph_module) -> list[tuple[str, object]]:
    """(name, module) in execution order; functional relu as `_RELU`, shape ops as None, other functions raise."""
    modules = dict(graph_module.named_modules())
    out: list[tuple[str, object]] = []
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            out.append((str(node.target), modules[node.target]))
        elif node.op in ("call_function", "call_method"):
            fname = getattr(node.target, "__name__", str(node.target))
            if node.target in (F.relu, torch.relu) or fname == "relu":
                out.append((fname, _RELU))
            elif fname in _SHAPE_OPS or node.target is torch.flatten:
                out.append((fname, None))
            else:
                raise AttackNotApplicable(f"spear attacks the first layer, but the model computes {fname} "
                                          "before it")
        elif node.op == "get_attr":
            raise AttackNotApplicable(f"spear needs the first parametrised layer to be nn.Linear, the model uses "
                                      f"parameter '{node.target}' directly")
    return out


@register_attack("spear")
class Spear(Attack):
    """SPEAR (Dimitrov et al. 2024): exact reconstruction of a batch from the gradient of a Linear+ReLU layer."""

    name = "spear"

    @dataclass(frozen=True)
    class Config:
        max_samples: int = knob(20_000_000, ge=1, help="budget of sampled (b-2)-row submatrices per observation")
        max_seconds: float | None = knob(300.0, gt=0, help="wall-clock budget per observation (null: none)")
        tau: float = knob(0.1, gt=0, lt=1, help="sparsity filter: a direction needs >= tau x active rows zeros")
        tol: float | None = knob(None, gt=0, lt=1, help="relative zero tolerance (null: from the gradient's rank-b residual)")
        subset: int = knob(12, ge=2, help="rows on which proposals are screened before a full count")
        chunk: int = knob(4096, ge=16, help="submatrices factorised per batched solve")
        deflate: bool = knob(True, help="condition later samples on found columns; false: the paper's uniform sampling")
        batch_size: str = knob("meta", choices=("meta", "estimate"),
                               help="b from the threat model (meta.batch_size; estimated when not granted) or always estimated")
        solver: str = knob("auto", choices=("auto", "sampling", "dictionary"),
                           help="search: SPEAR's sampling, the large-batch dictionary search, or auto (the cheaper: dictionary for exact b > 12, noisy b > 24, heavy noise)")
        seed: int = knob(0, help="seed of the sketch and of the sampling")
        device: str = knob("auto", choices=("auto", "cpu", "cuda"),
                           help="where the search's linear algebra runs: auto (a CUDA GPU when torch sees one, else "
                                "the CPU), cpu or cuda; the same random draws either way")

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.device = search_device(self.config.device)

    def check(self, model: nn.Module, meta: TrainMeta) -> None:
        super().check(model, meta)
        _, layer = first_linear_relu(model)
        m, n = layer.weight.shape
        b = meta.batch_size if self.config.batch_size == "meta" else None
        if b is not None and b >= min(m, n):
            raise AttackNotApplicable(f"spear needs batch size b < min(m, n) = {min(m, n)} for the first layer "
                                      f"({m}x{n}), the threat model grants b={b}")

    def reconstruct(self, obs: Observation) -> Reconstruction:
        prefix, layer = first_linear_relu(obs.model)
        grads = obs.gradient()
        cfg = self.config
        b = distinct_samples(obs.meta) if cfg.batch_size == "meta" else None
        after: dict[str, Tensor] = {}
        if obs.meta.mode == "fedavg" and (obs.meta.local_steps or 1) > 1:
            # The weights moved during local training: the certificate judges signs that agree at both ends.
            after = {k: getattr(layer, k).detach() + obs.update[f"{prefix}.{k}"] for k in ("weight", "bias")}
        result = reconstruct(
            layer.weight, layer.bias, grads[f"{prefix}.weight"], grads[f"{prefix}.bias"], b,
            max_samples=cfg.max_samples, max_seconds=cfg.max_seconds, tau=cfg.tau, tol=cfg.tol,
            subset=cfg.subset, chunk=cfg.chunk, deflate=cfg.deflate, solver=cfg.solver,
            weight_after=after.get("weight"), bias_after=after.get("bias"), seed=cfg.seed, device=self.device)
        inputs = result.inputs.reshape(result.batch_size, *obs.meta.input_shape).to(layer.weight)
        errors = result.sample_errors.cpu() if result.sample_errors is not None else None
        stats: dict[str, float | int | bool | str] = {
            "samples": result.samples, "proposals": result.proposals, "candidates": result.candidates,
            "seconds": round(result.seconds, 4), "batch_size": result.batch_size, "rank": result.rank,
            "mismatches": result.mismatches, "tol": result.tol, "fit_residual": result.fit_residual,
            "stage": result.stage, "solver": result.solver, "stop_reason": result.stop_reason,
            "budget_exhausted": result.budget_exhausted, "noise_std": result.noise_std,
            "noise_limited": result.noise_limited, "device": str(self.device),
            "sample_error_max": float(errors.max()) if errors is not None else math.nan,
            "samples_pinned": int((_CERT_SAFETY * errors <= _EXACT).sum()) if errors is not None else 0}
        if result.batch_size_estimated is not None:
            stats["batch_size_estimated"] = result.batch_size_estimated
        return Reconstruction(inputs=inputs, certified=result.certified, matching_loss=result.fit_residual,
                              stats=stats)


def search_device(name: str) -> torch.device:
    """The device `attack.device` names: auto is CUDA when torch sees a GPU, else the CPU; cuda without one is a
    configuration error (naming the key), not a silent fallback."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError("attack.device", name, "one of auto, cpu, cuda")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if name == "cuda":
            raise ConfigError("attack.device", name, "auto or cpu: torch sees no CUDA device on this machine")
        return torch.device("cpu")
    return torch.device("cuda")


def distinct_samples(meta: TrainMeta) -> int | None:
    """The rank the update really has: the distinct samples it was computed on (None when b is not granted).

    FedSGD: one batch, at most the client's examples. FedAvg with T local steps of batch B: the update is
    sum_t G_t X_t^T, of rank min(T B, examples) (batches without replacement, a new epoch reshuffles the same
    samples), with the inputs as its right factor whatever the steps (only the ReLU patterns move with W).
    """
    if meta.mode == "fedavg" and meta.distinct_samples is not None:  # the threat model counted them (epochs)
        return meta.distinct_samples
    if meta.batch_size is None:
        return None
    steps = 1 if meta.mode == "fedsgd" else (meta.local_steps or 1)
    b = meta.batch_size * steps
    if meta.num_examples is not None:
        b = min(b, meta.num_examples)
    return b

