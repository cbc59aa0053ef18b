"""Inverting Gradients (Geiping, Bauermeister, Droege, Moeller; NeurIPS 2020), with DLG and iDLG as presets.

Optimisation-based gradient inversion: find inputs whose gradient matches the observed one.

- Inverting Gradients (sec. 4 of the paper, `inversefed` defaults of `reconstruct_image.py`): one cosine distance
  over all layers concatenated, plus total variation; Adam on the sign of the gradient ("signed"); after each step
  the candidate is projected onto valid images ("boxed"); step size x0.1 at 3/8, 5/8 and 7/8 of the budget; several
  restarts, the one with the lowest matching loss wins. Labels by analytic recovery (`fedsim.attacks.labels`).
- DLG (Zhu, Liu, Han; NeurIPS 2019, alg. 1): squared Euclidean distance, L-BFGS with step 1, soft labels optimised
  jointly with the inputs. Registered as `dlg` (a preset: the same machinery with other defaults).
- iDLG (Zhao, Mopuri, Bilen 2020): DLG with the label recovered analytically. Registered as `idlg`.
- FedAvg (IG sec. 5, "multiple local steps"): when the client took several local SGD steps, the attack unrolls them
  differentiably on the candidate data and matches the resulting weight change instead of one gradient.

The core is `invert(problem, settings)` (tensors in, an `InversionResult` out); the attack classes only turn an
`Observation` into an `InversionProblem`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedsim.attacks.base import Attack, register_attack
from fedsim.attacks.labels import LABEL_METHODS, find_last_linear, last_layer_gradient, recover_labels, samples_in_update
from fedsim.attacks.matching import cosine_distance, cross_entropy, euclidean_distance, total_variation
from fedsim.errors import AttackNotApplicable, ReconstructionFailed
from fedsim.schema import knob
from fedsim.threat import Normalization, Observation, Reconstruction, TrainMeta

Distance = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], Mapping[str, Tensor] | None], Tensor]

DISTANCES: dict[str, Distance] = {"cosine": cosine_distance, "euclidean": euclidean_distance}

# IG's step schedule (inversefed `MultiStepLR(milestones=[3/8, 5/8, 7/8] * max_iterations, gamma=0.1)`).
LR_MILESTONES = (3 / 8, 5 / 8, 7 / 8)
LR_GAMMA = 0.1


# --- the client's computation, replayed on candidates ------------------------------------------------------------

@dataclass(frozen=True)
class LocalTraining:
    """How a FedAvg client turned its data into its update: `local_steps` SGD steps of step size `lr` on
    mini-batches of `batch_size`, taken in order from its samples and cycling (IG's `FedAvgReconstructor`), with
    torch's SGD `momentum` and `weight_decay` (0: plain SGD).

    Which sample went into which step is unknown to the server; the candidates simply take the places in order.
    With one mini-batch per round (num_examples <= batch_size) nothing hinges on it. With several, analytically
    recovered labels (a multiset, sorted) are spread over the steps arbitrarily: `label_strategy=joint` or granted
    labels fit that case better.
    """

    lr: float
    local_steps: int
    batch_size: int
    momentum: float = 0.0
    weight_decay: float = 0.0


def unrolled_update(model: nn.Module, inputs: Tensor, labels: Tensor, training: LocalTraining, *,
                    names: list[str] | None = None, create_graph: bool = True) -> dict[str, Tensor]:
    """The client's update on (inputs, labels) as a pseudo-gradient `(global - local) / lr`, differentiable in both.

    inputs: (n, *input_shape); labels: (n,) int64 or (n, classes) soft labels. Step t uses samples
    `[i * batch_size, (i + 1) * batch_size)` with `i = t mod (n // batch_size)`. For one step this equals
    `model_gradients(model, inputs[:batch_size], labels[:batch_size])`. Returns {name: tensor} for `names`
    (default: all parameters). Buffers are taken from `model` as they are.
    """
    start = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    current = dict(start)
    velocity = None
    batches = max(inputs.shape[0] // training.batch_size, 1)
    for step in range(training.local_steps):
        chunk = slice((step % batches) * training.batch_size, (step % batches + 1) * training.batch_size)
        logits = functional_call(model, {**buffers, **current}, (inputs[chunk],))
        loss = cross_entropy(logits, labels[chunk])
        grads = torch.autograd.grad(loss, list(current.values()), create_graph=create_graph)
        if training.weight_decay:
            grads = [g + training.weight_decay * p for g, p in zip(grads, current.values())]
        if training.momentum:  # torch.optim.SGD: buf = g on the first step, then momentum * buf + g
            velocity = list(grads) if velocity is None else [training.momentum * v + g for v, g in zip(velocity, grads)]
            grads = velocity
        current = {n: p - training.lr * g for (n, p), g in zip(current.items(), grads)}
    names = list(start) if names is None else names
    return {n: (start[n] - current[n]) / training.lr for n in names}


# --- the problem and the optimisation ----------------------------------------------------------------------------

@dataclass(frozen=True)
class InversionProblem:
    """What is matched, in the attacker's terms.

    model: a private copy of the global model (`attack_copy`): in the mode the client trained in (BatchNorm uses
        batch statistics in train mode), with exactly the parameters named in target requiring grad.
    target: the observed update as a gradient, {name: tensor} (a subset of the model's parameters); in FedAvg the
        pseudo-gradient `-delta / lr`.
    num_samples: n, how many inputs to reconstruct. input_shape: one sample's shape. num_classes: M.
    labels: (n,) int64 fixed labels, or None to optimise soft labels jointly with the inputs (DLG).
    lower, upper: the valid range of one input in model space, broadcastable to input_shape (the normalised image
        of [0, 1]), or None for unbounded inputs (vectors).
    mask: {name: 0/1 tensor} applied to the candidate before the distance (pruned observations), or None.
    local_training: replay the client's local steps (FedAvg); None matches a single gradient.
    """

    model: nn.Module
    target: Mapping[str, Tensor]
    num_samples: int
    input_shape: tuple[int, ...]
    num_classes: int
    labels: Tensor | None = None
    lower: Tensor | None = None
    upper: Tensor | None = None
    mask: Mapping[str, Tensor] | None = None
    local_training: LocalTraining | None = None

    def candidate_update(self, inputs: Tensor, labels: Tensor, create_graph: bool = True) -> dict[str, Tensor]:
        """The update a client holding (inputs, labels) would send, as a gradient, for the parameters in target."""
        names = list(self.target)
        if self.local_training is not None:
            return unrolled_update(self.model, inputs, labels, self.local_training, names=names,
                                   create_graph=create_graph)
        # The model is our own copy: differentiate through its parameters directly (as `model_gradients` does, minus
        # the cost of `functional_call`, ~0.2 ms a call). Nothing accumulates in their .grad: `invert` only calls
        # backward with inputs=[candidates].
        params = dict(self.model.named_parameters())
        loss = cross_entropy(self.model(inputs), labels)
        return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)))

    @property
    def images(self) -> bool:
        return len(self.input_shape) == 3


@dataclass(frozen=True)
class InversionSettings:
    """How the candidates are optimised; `InvertingConfig` documents each field and holds the defaults."""

    optimizer: str
    lr: float
    iterations: int
    time_budget: float | None
    restarts: int
    signed: bool
    boxed: bool
    lr_decay: bool
    distance: str
    tv_weight: float
    lbfgs_history: int
    seed: int


@dataclass(frozen=True)
class InversionResult:
    """The best restart's answer.

    inputs: (n, *input_shape) in model space, inside [lower, upper] when the problem has a box.
    labels: (n,) int64 (the fixed labels, or the argmax of the optimised soft labels).
    matching_loss: the distance between the answer's update and the target (no regulariser).
    restart_losses: matching loss of every restart that ran; best_restart indexes it.
    iterations: optimiser steps over all restarts; seconds: wall time of `invert`.
    stopped_by_time: whether the time budget ended some restart before its iteration budget.
    """

    inputs: Tensor
    labels: Tensor
    matching_loss: float
    restart_losses: tuple[float, ...]
    best_restart: int
    iterations: int
    seconds: float
    stopped_by_time: bool


def invert(problem: InversionProblem, settings: InversionSettings) -> InversionResult:
    """Reconstruct the inputs behind `problem.target` by gradient matching, with restarts.

    The time budget (seconds, for all restarts together) is shared out: restart r must end by
    `start + budget * (r + 1) / restarts`, so time one restart leaves unused passes to the next. The step-size
    schedule follows whichever budget runs out first. Raises `ReconstructionFailed` when no restart produced a
    finite matching loss.
    """
    if settings.distance not in DISTANCES:
        raise ValueError(f"distance={settings.distance!r}: expected one of {', '.join(DISTANCES)}")
    if settings.optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer={settings.optimizer!r}: expected one of {', '.join(_OPTIMIZERS)}")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(settings.seed)
    param = next(problem.model.parameters())
    best: _Restart | None = None
    losses: list[float] = []
    iterations, stopped_by_time, best_index = 0, False, -1
    for restart in range(settings.restarts):
        deadline = math.inf if settings.time_budget is None else (
            start + settings.time_budget * (restart + 1) / settings.restarts)
        if time.perf_counter() >= deadline and restart > 0:
            stopped_by_time = True
            break
        x0 = torch.randn((problem.num_samples, *problem.input_shape), generator=gen).to(param)  # IG 'randn' init
        u0 = None if problem.labels is not None else (
            torch.randn((problem.num_samples, problem.num_classes), generator=gen).to(param))  # DLG's dummy label
        run = _optimise(problem, settings, x0, u0, deadline)
        iterations += run.iterations
        stopped_by_time |= run.stopped_by_time
        losses.append(run.matching_loss)
        if math.isfinite(run.matching_loss) and (best is None or run.matching_loss < best.matching_loss):
            best, best_index = run, restart
    if best is None:
        raise ReconstructionFailed(f"every restart ended with a non-finite matching loss ({losses})")
    return InversionResult(best.inputs, best.labels, best.matching_loss, tuple(losses), best_index, iterations,
                           time.perf_counter() - start, stopped_by_time)


@dataclass(frozen=True)
class _Restart:
    inputs: Tensor
    labels: Tensor
    matching_loss: float
    iterations: int
    stopped_by_time: bool


def _adam(params: list[Tensor], settings: InversionSettings) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=settings.lr)


def _lbfgs(params: list[Tensor], settings: InversionSettings) -> torch.optim.Optimizer:
    # One L-BFGS iteration per `step` (max_iter=1) so that budgets are checked between iterations; the curvature
    # history lives in the optimiser state, so this is the same iteration sequence as DLG's step(max_iter=20) loop.
    return torch.optim.LBFGS(params, lr=settings.lr, max_iter=1, history_size=settings.lbfgs_history)


_OPTIMIZERS: dict[str, Callable[[list[Tensor], InversionSettings], torch.optim.Optimizer]] = {
    "adam": _adam, "lbfgs": _lbfgs}


def _decayed_lr(settings: InversionSettings, progress: float) -> float:
    if not settings.lr_decay:
        return settings.lr
    return settings.lr * LR_GAMMA ** sum(progress >= m for m in LR_MILESTONES)


def _optimise(problem: InversionProblem, settings: InversionSettings, x0: Tensor, u0: Tensor | None,
              deadline: float) -> _Restart:
    """One restart: optimise inputs (and soft-label logits when labels are not fixed) from (x0, u0)."""
    distance = DISTANCES[settings.distance]
    boxed = settings.boxed and problem.lower is not None
    x = _project(x0, problem) if boxed else x0.clone()
    x.requires_grad_(True)
    u = None if u0 is None else u0.clone().requires_grad_(True)
    variables = [x] if u is None else [x, u]
    optimizer = _OPTIMIZERS[settings.optimizer](variables, settings)
    use_tv = settings.tv_weight > 0 and problem.images
    begin = time.perf_counter()
    last_good = x.detach().clone(), None if u is None else u.detach().clone()

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=False)
        labels = problem.labels if u is None else torch.softmax(u, dim=-1)
        loss = distance(problem.candidate_update(x, labels), problem.target, problem.mask)
        if use_tv:
            loss = loss + settings.tv_weight * total_variation(x)
        loss.backward(inputs=variables)  # not into the model's parameters: ~30 % of the backward pass on the CNN
        if settings.signed:  # IG: Adam on sign(grad) ("signed"), robust to the gradient's scale
            for v in variables:
                v.grad.sign_()
        return loss

    step, stopped_by_time = 0, False
    while step < settings.iterations:
        now = time.perf_counter()
        if now >= deadline:
            stopped_by_time = True
            break
        progress = step / settings.iterations
        if math.isfinite(deadline):
            progress = max(progress, (now - begin) / max(deadline - begin, 1e-9))
        for group in optimizer.param_groups:
            group["lr"] = _decayed_lr(settings, progress)
        loss = optimizer.step(closure)
        step += 1
        with torch.no_grad():
            if not (torch.isfinite(loss) and torch.isfinite(x).all()):  # L-BFGS without line search can diverge
                x.copy_(last_good[0])
                if u is not None:
                    u.copy_(last_good[1])
                break
            if boxed:  # IG "boxed": keep the candidate a valid image
                x.copy_(_project(x, problem))
            last_good = x.detach().clone(), None if u is None else u.detach().clone()

    inputs = _project(x.detach(), problem) if problem.lower is not None else x.detach().clone()
    labels = problem.labels if u is None else torch.softmax(u.detach(), dim=-1)
    with torch.enable_grad():
        final = distance(problem.candidate_update(inputs, labels, create_graph=False), problem.target, problem.mask)
    hard = problem.labels if u is None else u.detach().argmax(dim=-1)
    return _Restart(inputs, hard.to(torch.int64), float(final.detach()), step, stopped_by_time)


def _project(x: Tensor, problem: InversionProblem) -> Tensor:
    return torch.maximum(torch.minimum(x, problem.upper), problem.lower)


# --- from an observation to a problem ----------------------------------------------------------------------------

def attack_copy(model: nn.Module, names: list[str], train_mode: bool) -> nn.Module:
    """A private copy of `model` for `InversionProblem`: train or eval mode, only the `names` parameters require
    grad (the candidate gradient is taken with respect to them; the others stay constants)."""
    copied = copy.deepcopy(model).train(train_mode)
    for name, p in copied.named_parameters():
        p.requires_grad_(name in names)
    return copied


def pixel_box(normalization: Normalization, input_shape: tuple[int, ...]) -> tuple[Tensor, Tensor] | None:
    """(lower, upper): the model-space image of pixel values 0 and 1, shaped to broadcast over (n, *input_shape).

    None for inputs that are not images (C, H, W): vectors have no natural box.
    """
    if len(input_shape) != 3:
        return None
    channels = input_shape[0]
    lower = normalization.from_pixels(torch.zeros(channels, 1, 1))
    upper = normalization.from_pixels(torch.ones(channels, 1, 1))
    return lower.expand(channels, 1, 1).clone(), upper.expand(channels, 1, 1).clone()


def looks_pruned(update: Mapping[str, Tensor], threshold: float) -> bool:
    """Whether an update looks pruned: every weight tensor (2+ dims) has at least `threshold` exact zeros.

    A raw gradient can be sparse in some layers (ReLU kills rows of the dense layers: 60 % zeros in the small CNN's
    first Linear layer at b = 1), but the first layer's weight gradient is dense, since the input is; per-tensor
    pruning makes every tensor sparse.
    """
    weights = [v for v in update.values() if v.dim() >= 2]
    return bool(weights) and min(float((v == 0).float().mean()) for v in weights) >= threshold


@dataclass(frozen=True)
class InvertingConfig:
    """Knobs of `inverting` (conf/attack/inverting.yaml); `dlg` and `idlg` subclass it with their papers' values."""

    iterations: int = knob(1000, ge=1, help="optimiser steps per restart (paper: 24000; ~13 ms each for the CNN)")
    time_budget: float | None = knob(None, gt=0, help="seconds for all restarts together; None: no limit")
    restarts: int = knob(1, ge=1, help="random starts; the lowest matching loss wins (paper: 8 to 32)")
    optimizer: str = knob("adam", choices=tuple(_OPTIMIZERS), help="adam (IG) or lbfgs (DLG)")
    lr: float = knob(0.1, gt=0, help="step size (IG: 0.1 with signed Adam; DLG: 1 with L-BFGS)")
    lr_decay: bool = knob(True, help="step size x0.1 at 3/8, 5/8, 7/8 of the budget (IG)")
    signed: bool = knob(True, help="optimise with the sign of the gradient (IG)")
    boxed: bool = knob(True, help="project candidates onto valid images, pixels in [0, 1], after each step (IG)")
    distance: str = knob("cosine", choices=tuple(DISTANCES),
                         help="cosine over all layers at once (IG) or squared euclidean (DLG)")
    tv_weight: float = knob(1e-2, ge=0, help="weight of the total variation of the candidate (model space)")
    label_strategy: str = knob("analytic", choices=("analytic", "joint"),
                               help="analytic: fedsim.attacks.labels; joint: optimise soft labels with the inputs (DLG)")
    label_method: str = knob("auto", choices=LABEL_METHODS, help="analytic method (see attack=labels)")
    mask: str = knob("auto", choices=("auto", "on", "off"),
                     help="match only the non-zero coordinates of a pruned update; auto: when it looks pruned")
    mask_threshold: float = knob(0.5, gt=0, lt=1, help="auto mask: least zero fraction of every weight tensor")
    unroll: str = knob("auto", choices=("auto", "on", "off"),
                       help="replay FedAvg local steps differentiably; auto: when mode=fedavg and local_steps>1")
    train_mode: bool = knob(True, help="run the model in train mode, as the client did (BatchNorm batch statistics)")
    lbfgs_history: int = knob(100, ge=1, help="L-BFGS curvature pairs kept (torch default 100)")
    seed: int = knob(0, help="seed of the random starts")


@register_attack("inverting")
class InvertingGradients(Attack):
    """Inverting Gradients: signed Adam on a global cosine distance plus TV, boxed, with restarts."""

    name = "inverting"
    Config = InvertingConfig
    requires = frozenset({"batch_size"})  # or the labels, which give the batch size away

    def check(self, model: nn.Module, meta: TrainMeta) -> None:
        cfg = self.config
        if meta.labels is None:
            super().check(model, meta)
        if meta.labels is None and cfg.label_strategy == "analytic":
            find_last_linear(model, meta.input_shape)
            if cfg.label_method == "idlg" and samples_in_update(meta) != 1:
                raise AttackNotApplicable(f"{self.name} recovers labels by iDLG, which needs one sample per update "
                                          f"(here {samples_in_update(meta)}); use label_method=auto")
        if self._unrolls(meta) and (meta.lr is None or meta.local_steps is None or meta.batch_size is None):
            raise AttackNotApplicable(f"{self.name} replays FedAvg local steps: it needs lr, local_steps and "
                                      "batch_size from the threat model (or unroll=off)")
        if self._unrolls(meta) and meta.optimizer.name != "sgd":
            raise AttackNotApplicable(f"{self.name} replays local steps of SGD (with momentum and weight decay); "
                                      f"the threat model says optimizer={meta.optimizer.name} (use unroll=off)")
        if meta.mode == "fedavg" and meta.lr is None and cfg.distance != "cosine":
            raise AttackNotApplicable(f"{self.name} with distance={cfg.distance} needs the client lr in FedAvg "
                                      "(cosine is scale-free and does not)")

    def _unrolls(self, meta: TrainMeta) -> bool:
        if self.config.unroll == "auto":
            return meta.mode == "fedavg" and (meta.local_steps or 1) > 1
        return self.config.unroll == "on"

    def problem(self, obs: Observation) -> tuple[InversionProblem, dict[str, float | int | bool | str]]:
        """The inversion problem posed by one observation, and what was decided on the way (for stats)."""
        cfg, meta = self.config, obs.meta
        self.check(obs.model, meta)
        count = samples_in_update(meta)
        if count is None:
            raise AttackNotApplicable(f"{self.name} needs the threat model to grant batch_size (or labels)")
        if meta.mode == "fedavg" and meta.lr is None:
            target = {k: -v for k, v in obs.update.items()}  # -delta: a gradient up to scale, enough for cosine
        else:
            target = obs.gradient()
        target = {k: v.detach() for k, v in target.items()}
        stats: dict[str, float | int | bool | str] = {}
        if meta.labels is not None:
            device = next(iter(target.values())).device
            labels, stats["label_method"] = meta.labels.long().reshape(-1).to(device), "granted"
        elif cfg.label_strategy == "analytic":
            grad_w, grad_b = last_layer_gradient(obs.model, target, meta.input_shape)
            labels, stats["label_method"] = recover_labels(grad_w, grad_b, count, cfg.label_method), cfg.label_method
        else:
            labels, stats["label_method"] = None, "joint"
        masked = cfg.mask == "on" or (cfg.mask == "auto" and looks_pruned(target, cfg.mask_threshold))
        stats["masked"] = masked
        training = None
        if self._unrolls(meta):
            training = LocalTraining(float(meta.lr), int(meta.local_steps), int(meta.batch_size),
                                     meta.optimizer.momentum, meta.optimizer.weight_decay)
        stats["unrolled"] = training is not None
        model = attack_copy(obs.model, list(target), cfg.train_mode)
        box = pixel_box(meta.normalization, meta.input_shape)
        param = next(model.parameters())
        return InversionProblem(
            model=model, target=target, num_samples=count, input_shape=tuple(meta.input_shape),
            num_classes=meta.num_classes, labels=labels,
            lower=None if box is None else box[0].to(param), upper=None if box is None else box[1].to(param),
            mask={k: (v != 0).to(v.dtype) for k, v in target.items()} if masked else None,
            local_training=training), stats

    def settings(self) -> InversionSettings:
        """The optimisation knobs of this attack's config."""
        names = [f.name for f in dataclasses.fields(InversionSettings)]
        return InversionSettings(**{name: getattr(self.config, name) for name in names})

    def reconstruct(self, obs: Observation) -> Reconstruction:
        problem, stats = self.problem(obs)
        result = invert(problem, self.settings())
        stats.update(iterations=result.iterations, seconds=round(result.seconds, 3),
                     stopped_by_time=result.stopped_by_time, restarts_run=len(result.restart_losses),
                     best_restart=result.best_restart)
        return Reconstruction(inputs=result.inputs, labels=result.labels, matching_loss=result.matching_loss,
                              stats=stats)


@dataclass(frozen=True)
class DLGConfig(InvertingConfig):
    """DLG's defaults (mit-han-lab/dlg `main.py`): L-BFGS step 1, euclidean distance, joint soft labels, no prior."""

    iterations: int = knob(3000, ge=1, help="L-BFGS iterations per restart (DLG: 300 steps of up to 20 each)")
    optimizer: str = knob("lbfgs", choices=tuple(_OPTIMIZERS), help="adam (IG) or lbfgs (DLG)")
    lr: float = knob(1.0, gt=0, help="step size (DLG: L-BFGS with step 1, no line search)")
    lr_decay: bool = knob(False, help="step size x0.1 at 3/8, 5/8, 7/8 of the budget (IG)")
    signed: bool = knob(False, help="optimise with the sign of the gradient (IG)")
    boxed: bool = knob(False, help="project candidates onto valid images after each step (IG)")
    distance: str = knob("euclidean", choices=tuple(DISTANCES), help="squared euclidean (DLG) or cosine (IG)")
    tv_weight: float = knob(0.0, ge=0, help="weight of the total variation of the candidate (DLG: none)")
    label_strategy: str = knob("joint", choices=("analytic", "joint"),
                               help="joint: optimise soft labels with the inputs (DLG); analytic: fedsim.attacks.labels")


@register_attack("dlg")
class DLG(InvertingGradients):
    """Deep Leakage from Gradients: `inverting` with DLG's defaults."""

    name = "dlg"
    Config = DLGConfig


@dataclass(frozen=True)
class IDLGConfig(DLGConfig):
    """iDLG: DLG with the label recovered from the last layer's gradient (exact for one sample)."""

    label_strategy: str = knob("analytic", choices=("analytic", "joint"),
                               help="analytic: fedsim.attacks.labels (iDLG); joint: optimise soft labels (DLG)")
    label_method: str = knob("idlg", choices=LABEL_METHODS, help="iDLG's rule for b = 1; auto also handles b > 1")


@register_attack("idlg")
class IDLG(InvertingGradients):
    """improved DLG: `dlg` with analytic labels."""

    name = "idlg"
    Config = IDLGConfig
