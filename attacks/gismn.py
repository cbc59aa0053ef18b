"""GI-SMN-style gradient inversion with a style-based generative prior (Qian et al., arXiv 2405.03516).

GI-SMN inverts a shared gradient by searching the latent space of a pre-trained style-based generator (StyleGAN-XL
in the paper) instead of pixel space: the prior shrinks the search space, which is what lets it work against pruned
and noisy gradients. fedsim cannot download StyleGAN-XL, so the prior here is `MiniStyleGen`, a small StyleGAN2-like
generator trained offline on bundled photographs (`fedsim.attacks.prior`); `docs/gismn.md` lists what that changes.

The attack (`GISMN`, registered as `gismn`), for R restarts of a batch of B images in parallel:

1. labels: granted by the threat model, or recovered from the last layer's gradient (iDLG for B = 1, Yin et al.'s
   min-row rule for B > 1);
2. stage 1, latent search: Adam on z in R^{z_dim} through `x = G(z)`, pure gradient matching
   `min_z D(grad_theta l(f(G(z)), y), g)`;
3. stage 2, refinement in W+ (one style vector per layer): Adam on w+ with
   `D + l_tv TV(x) + l_norm |x|^2/HW + l_group |x - mean_r x|^2/HW + l_anchor |w+ - w+_0|^2`,
   the group term pulling each restart towards the mean over restarts (GradInversion/GIFD, not the batch mean);
4. stage 3, bounded pixel polish: `x = clip(G(w+) + delta, 0, 1)`, `|delta|_inf <= eps`, Adam on delta with D + TV;
5. the restart with the lowest matching loss D wins (Inverting Gradients' `scoring_choice='loss'`).

D is Inverting Gradients' global cosine distance, masked to the observed non-zeros when the gradient was pruned
(GIFD's `sim_cmpr`), or the squared Euclidean distance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.attacks.base import Attack, register_attack
from fedsim.attacks.generator import _LUMA, PRIOR_SOURCES, GeneratorConfig, MiniStyleGen, build_generator  # noqa: F401
from fedsim.attacks.labels import recover_labels
from fedsim.attacks.matching import cosine_distance, euclidean_distance, model_gradients, nonzero_mask, total_variation
from fedsim.attacks.prior import PriorConfig, obtain_prior
from fedsim.errors import AttackNotApplicable, ReconstructionFailed
from fedsim.schema import knob
from fedsim.threat import Observation, Reconstruction, TrainMeta

# --- the attack -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GISMNConfig:
    """Knobs of the gismn attack (conf/attack/gismn.yaml)."""

    restarts: int = knob(2, ge=1, help="independent reconstructions optimised in parallel; lowest matching loss wins")
    stage1_iterations: int = knob(50, ge=0, help="Adam steps on z (latent search, pure gradient matching)")
    stage1_lr: float = knob(0.05, gt=0.0, help="Adam learning rate on z")
    stage2_iterations: int = knob(400, ge=0, help="Adam steps on W+ (per-layer styles) with regularisers")
    stage2_lr: float = knob(0.05, gt=0.0, help="Adam learning rate on W+")
    stage3_iterations: int = knob(100, ge=0, help="Adam steps of the bounded pixel polish")
    stage3_lr: float = knob(0.01, gt=0.0, help="Adam learning rate on the pixel offset delta")
    polish_radius: float = knob(0.08, ge=0.0, le=1.0, help="|delta|_inf bound of the pixel polish, pixels in [0, 1]")
    tv_weight: float = knob(1e-4, ge=0.0, help="total variation (pixels) in stages 2 and 3")
    norm_weight: float = knob(1e-6, ge=0.0, help="image norm |x|^2 / HW in stage 2")
    group_weight: float = knob(1e-2, ge=0.0, help="group consistency |x - mean over restarts|^2 / HW in stage 2")
    group_start: float = knob(0.25, ge=0.0, le=1.0, help="share of stage 2 before the group term switches on")
    group_refresh: int = knob(50, ge=1, help="stage-2 steps between refreshes of the restart mean")
    anchor_weight: float = knob(0.0, ge=0.0, help="|w+ - w+ after stage 1|^2 per image in stage 2 (0: off)")
    distance: str = knob("cosine", choices=("cosine", "euclidean"), help="gradient distance D")
    mask: str = knob("auto", choices=("auto", "on", "off"),
                     help="match only the observed non-zeros (pruned gradients); auto: when the gradient looks pruned")
    mask_threshold: float = knob(0.2, gt=0.0, lt=1.0,
                                 help="auto: mask when the median per-tensor share of exact zeros is at least this")
    time_budget_s: float | None = knob(None, gt=0.0, help="wall-clock budget of one reconstruction (None: none)")
    lr_decay: str = knob("cosine", choices=("cosine", "step"),
                         help="per-stage learning-rate decay: cosine to 0, or x0.1 at 3/8, 5/8, 7/8 (as IG)")
    seed: int = knob(0, help="seed of the initial latents")
    prior_source: str = knob("auxiliary", choices=PRIOR_SOURCES,
                             help="data the prior was trained on (python -m fedsim.attacks.prior --source)")
    prior_root: str | None = knob(None, help="torchvision root for a torchvision prior source")
    prior_steps: int = knob(600, ge=1, help="training steps of the prior to load (part of its cache name)")
    prior_seed: int = knob(0, help="training seed of the prior to load")
    prior_cache: str | None = knob(None, help="cache directory (None: $FEDSIM_CACHE/priors or ~/.cache/fedsim/priors)")
    train_if_missing: bool = knob(True, help="train and cache the prior when it is not cached (minutes on a CPU)")
    progress: bool = knob(True, help="show a progress bar while training the prior")


@dataclass
class StageLog:
    """One optimisation stage: iterations run and the mean matching loss over restarts at its start and end."""

    iterations: int = 0
    seconds: float = 0.0
    loss_start: float = float("nan")
    loss_end: float = float("nan")
    truncated: bool = False


@dataclass
class GISMNResult:
    """Everything `run_gismn` produces. pixels: (restarts, b, C, H, W) in [0, 1]; losses: (restarts,) final D."""

    pixels: Tensor
    losses: Tensor
    best: int
    generator_pixels: Tensor                        # (restarts, b, C, H, W): G(w+) before the pixel polish
    generator_losses: Tensor                        # (restarts,) D of generator_pixels
    stages: dict[str, StageLog] = field(default_factory=dict)


def pruned_share(gradient: Mapping[str, Tensor]) -> float:
    """Median over tensors of the share of exact zeros: ~0 for a dense gradient, ~p after per-tensor pruning by p.

    The median ignores the exact zeros a ReLU network produces on its own (dead units zero whole rows of a few
    tensors, but leave the first layer's weights and the last bias dense).
    """
    shares = torch.tensor([float((t == 0).float().mean()) for t in gradient.values() if t.numel() > 0])
    return float(shares.median()) if len(shares) else 0.0


def to_victim_space(images: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Generator images (n, 3, 32, 32) -> the victim's pixels (n, C, H, W): bilinear resize, luma for C = 1."""
    c, h, w = shape
    if images.shape[-2:] != (h, w):
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False,
                               antialias=h < images.shape[-2] or w < images.shape[-1])
    if c == 1:
        luma = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        images = (images * luma).sum(dim=1, keepdim=True)
    return images


def run_gismn(generator: MiniStyleGen, match: Callable[[Tensor], Tensor], restarts: int, batch: int,
              shape: tuple[int, ...], config: GISMNConfig, *, device: torch.device | str = "cpu") -> GISMNResult:
    """The three GI-SMN stages for `restarts` x `batch` images against a gradient distance.

    match: pixels (batch, C, H, W) in [0, 1] -> scalar D(grad l(f(x), y), g) of one restart (differentiable).
    shape: the victim's (C, H, W). Returns all restarts; `best` is the one with the lowest final D.
    """
    gen_rng = torch.Generator(device="cpu").manual_seed(config.seed)
    zdim = generator.config.z_dim
    start = time.perf_counter()
    total_iters = config.stage1_iterations + config.stage2_iterations + config.stage3_iterations
    done_iters = 0
    hw = shape[1] * shape[2]

    def deadline(stage_iters: int) -> float:
        if config.time_budget_s is None or total_iters == 0:
            return math.inf
        return start + config.time_budget_s * (done_iters + stage_iters) / total_iters

    def render(ws: Tensor) -> Tensor:  # (R*B, num_ws, w_dim) -> (R, B, C, H, W) victim pixels
        return to_victim_space(generator.synthesis(ws), shape).view(restarts, batch, *shape)

    def matching(x: Tensor) -> Tensor:  # (R, B, C, H, W) -> (R,)
        return torch.stack([match(x[r]) for r in range(restarts)])

    def optimise(name: str, params: list[Tensor], lr: float, iters: int,
                 objective: Callable[[int], tuple[Tensor, Tensor]], project: Callable[[], None] | None = None) -> None:
        """Adam with a learning-rate decay over the stage (config.lr_decay)."""
        nonlocal done_iters
        log = StageLog()
        stages[name] = log
        if iters == 0:
            return
        t0, stop = time.perf_counter(), deadline(iters)
        optimizer = torch.optim.Adam(params, lr=lr)
        if config.lr_decay == "step":  # Inverting Gradients: x0.1 at 3/8, 5/8, 7/8
            milestones = [int(iters * f) for f in (3 / 8, 5 / 8, 7 / 8)]
            schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        else:  # cosine from lr to 0 over the stage
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / iters)))
        for step in range(iters):
            total, dist = objective(step)
            if step == 0:
                log.loss_start = float(dist.mean())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            schedule.step()
            if project is not None:
                with torch.no_grad():
                    project()
            log.iterations = step + 1
            log.loss_end = float(dist.mean())
            if time.perf_counter() > stop:
                log.truncated = step + 1 < iters
                break
        if not math.isfinite(log.loss_end):
            raise ReconstructionFailed(f"gismn {name}: the matching loss became {log.loss_end}")
        log.seconds = time.perf_counter() - t0
        done_iters += iters

    stages: dict[str, StageLog] = {}

    # Stage 1: latent search in Z, pure gradient matching.
    z = torch.randn(restarts * batch, zdim, generator=gen_rng).to(device).requires_grad_(True)

    def stage1(step: int) -> tuple[Tensor, Tensor]:
        dist = matching(render(generator.styles(z)))
        return dist.sum(), dist.detach()

    optimise("stage1", [z], config.stage1_lr, config.stage1_iterations, stage1)

    # Stage 2: refinement in W+ (each layer its own style), with regularisers.
    ws0 = generator.styles(z.detach()).detach().clone()
    ws = ws0.clone().requires_grad_(True)
    group_mean: Tensor | None = None
    group_on = int(config.group_start * config.stage2_iterations)

    def stage2(step: int) -> tuple[Tensor, Tensor]:
        nonlocal group_mean
        x = render(ws)
        dist = matching(x)
        flat = x.flatten(2)                                                   # (R, B, C*H*W)
        reg = config.tv_weight * torch.stack([total_variation(x[r]) for r in range(restarts)])
        reg = reg + config.norm_weight * flat.pow(2).sum(-1).mean(-1) / hw
        if config.group_weight > 0 and restarts > 1 and step >= group_on:
            if group_mean is None or (step - group_on) % config.group_refresh == 0:
                group_mean = x.detach().mean(dim=0, keepdim=True)               # mean over restarts (GradInversion)
            reg = reg + config.group_weight * (x - group_mean).flatten(2).pow(2).sum(-1).mean(-1) / hw
        anchor = (ws - ws0).pow(2).view(restarts, batch, -1).sum(-1).mean(-1)
        reg = reg + config.anchor_weight * anchor
        return (dist + reg).sum(), dist.detach()

    optimise("stage2", [ws], config.stage2_lr, config.stage2_iterations, stage2)

    # Stage 3: bounded pixel polish around the generator's image.
    with torch.no_grad():
        base = render(ws.detach())
    generator_losses = matching_no_graph(matching, base)
    delta = torch.zeros_like(base, requires_grad=True)

    def stage3(step: int) -> tuple[Tensor, Tensor]:
        x = (base + delta).clamp(0.0, 1.0)
        dist = matching(x)
        reg = config.tv_weight * torch.stack([total_variation(x[r]) for r in range(restarts)])
        return (dist + reg).sum(), dist.detach()

    def project() -> None:
        delta.clamp_(-config.polish_radius, config.polish_radius)

    optimise("stage3", [delta], config.stage3_lr, config.stage3_iterations, stage3, project)
    pixels = (base + delta.detach()).clamp(0.0, 1.0)
    losses = matching_no_graph(matching, pixels)
    best = int(losses.argmin())
    return GISMNResult(pixels, losses, best, base, generator_losses, stages)


def matching_no_graph(matching: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """D of every restart without keeping a graph: (R,)."""
    with torch.enable_grad():  # the candidate gradient itself needs autograd, its graph is dropped
        return matching(x.detach()).detach()


def last_layer(names: list[str], gradient: Mapping[str, Tensor], num_classes: int) -> tuple[str, str | None]:
    """Names of the last Linear layer's weight (classes, d) and bias (classes,) gradient; ValueError if absent."""
    for i in range(len(names) - 1, -1, -1):
        g = gradient[names[i]]
        if g.dim() == 2 and g.shape[0] == num_classes:
            bias = names[i + 1] if i + 1 < len(names) and gradient[names[i + 1]].shape == (num_classes,) else None
            return names[i], bias
        if g.dim() != 1:
            break
    raise ValueError("the model does not end in a Linear layer with one output per class")


@register_attack("gismn")
class GISMN(Attack):
    """GI-SMN-style attack: generator latent search (Z), W+ refinement, bounded pixel polish (module docstring)."""

    name = "gismn"
    Config = GISMNConfig

    def __init__(self, config: GISMNConfig | None = None, *, prior=None) -> None:
        super().__init__(config)
        self._prior = prior  # an fedsim.attacks.prior.Prior; loaded (or trained) on first use when None

    # Knobs -> the prior's identity in the cache.
    def prior_config(self):
        cfg = self.config
        return PriorConfig(source=cfg.prior_source, root=cfg.prior_root, steps=cfg.prior_steps, seed=cfg.prior_seed)

    def prior(self):
        """The generative prior: given, cached, or (with `train_if_missing`) trained now."""
        if self._prior is None:
            self._prior = obtain_prior(self.prior_config(), self.config.prior_cache,
                                       train_if_missing=self.config.train_if_missing, progress=self.config.progress)
        return self._prior

    def check(self, model: nn.Module, meta: TrainMeta) -> None:
        shape = tuple(meta.input_shape)
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise AttackNotApplicable(f"gismn needs RGB or grey images (C, H, W), the data gives shape {shape}")
        if not (8 <= min(shape[1:]) and max(shape[1:]) <= 256):
            raise AttackNotApplicable(f"gismn's 32x32 generator is resized to the victim; sides 8..256 only, "
                                      f"not {shape[1:]}")
        if meta.batch_size is None and meta.labels is None:
            raise AttackNotApplicable("gismn needs the threat model to grant batch_size (or the labels)")
        if meta.mode == "fedavg" and meta.lr is None:
            raise AttackNotApplicable("gismn on FedAvg needs the client learning rate (treats -delta/lr as a gradient)")
        if meta.labels is None:
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
            try:
                last_layer(list(params), params, meta.num_classes)
            except ValueError:
                raise AttackNotApplicable("gismn recovers labels from a last Linear layer (classes x d), which this "
                                          "model lacks; grant the labels") from None
        self.prior()  # fail (or train) at the door, not in round 1

    def reconstruct(self, obs: Observation) -> Reconstruction:
        cfg, meta = self.config, obs.meta
        model = obs.model
        device = next(model.parameters()).device
        gradient = obs.gradient()
        names = [n for n, _ in model.named_parameters() if n in gradient]
        target = {n: gradient[n].detach().to(device=device, dtype=torch.float32) for n in names}
        zero_share = pruned_share(target)
        masked = cfg.mask == "on" or (cfg.mask == "auto" and zero_share >= cfg.mask_threshold)
        mask = nonzero_mask(target) if masked else None

        if meta.labels is not None:
            labels, label_source = meta.labels.to(device=device, dtype=torch.int64).flatten(), "granted"
        else:
            weight, bias = last_layer(names, target, meta.num_classes)
            labels = recover_labels(target[weight], target[bias] if bias else None, int(meta.batch_size))
            label_source = "analytic"
        batch = len(labels)

        generator = self.prior().generator.to(device)
        distance = cosine_distance if cfg.distance == "cosine" else euclidean_distance
        normalization = meta.normalization

        def match(pixels: Tensor) -> Tensor:
            candidate = model_gradients(model, normalization.from_pixels(pixels), labels, names=names)
            return distance(candidate, target, mask)

        t0 = time.perf_counter()
        result = run_gismn(generator, match, cfg.restarts, batch, tuple(meta.input_shape), cfg, device=device)
        best = result.best
        stats: dict[str, float | int | bool | str] = {
            "seconds": time.perf_counter() - t0,
            "restart": best,
            "masked": masked,
            "zero_share": zero_share,
            "labels": label_source,
            "generator_loss": float(result.generator_losses[best]),
            "loss_spread": float(result.losses.max() - result.losses.min()),
        }
        for name, log in result.stages.items():
            stats[f"{name}_iterations"] = log.iterations
            stats[f"{name}_loss"] = log.loss_end
            stats[f"{name}_seconds"] = log.seconds
            if log.truncated:
                stats[f"{name}_truncated"] = True
        inputs = normalization.from_pixels(result.pixels[best]).detach()
        return Reconstruction(inputs=inputs, labels=labels.cpu(), matching_loss=float(result.losses[best]),
                              stats=stats)
