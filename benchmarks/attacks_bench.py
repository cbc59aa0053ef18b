"""Benchmark of the optimisation attacks: PSNR / SSIM / label accuracy / time against batch size and defense, and the
per-iteration overhead of Inverting Gradients over a bare PyTorch loop.

    PYTHONPATH=. python benchmarks/attacks_bench.py                       # the full grid (tens of minutes on 2 cores)
    PYTHONPATH=. python benchmarks/attacks_bench.py --reduced             # what BENCHMARKS.md records
    PYTHONPATH=. python benchmarks/attacks_bench.py --attacks dlg,inverting,gismn   # add any registered attack
    PYTHONPATH=. python benchmarks/attacks_bench.py --part fedavg --reduced   # FedAvg: replayed steps vs plain

Every attack runs with its own defaults (conf/attack/<name>.yaml) plus `--time-budget` seconds per reconstruction,
on 32x32 RGB natural-image patches against untrained models. Defenses are applied to the client's gradient here
(`prune`: keep the top 10 % of each tensor by magnitude; `noise`: add N(0, sigma^2) per coordinate with sigma the
RMS of the whole gradient, i.e. a signal-to-noise ratio of 1). Reconstructions are matched to the true batch by one
Hungarian assignment on MSE before scoring. Results go to the "Optimisation attacks" section of BENCHMARKS.md
(`--part fedavg`: its own "Optimisation attacks: FedAvg local steps" section).

Another registered attack joins the grid through `bench_attack(name, ...)` (or `--attacks`); `knobs` overrides its
defaults, and `--time-budget` reaches it through a `time_budget` knob when its config has one. It must return
inputs in model space (`Reconstruction.inputs`).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.attacks.base import ATTACKS, build_attack  # noqa: E402
from fedsim.attacks.inverting import invert, pixel_box  # noqa: E402
from fedsim.attacks.matching import model_gradients  # noqa: E402
from fedsim.data import DataBundle, load_dataset  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.threat import Observation, TrainMeta  # noqa: E402

SHAPE = (3, 32, 32)
SECTION = "## Optimisation attacks"


# --- defenses, local to the benchmark until defenses/ has them ---------------------------------------------------

def prune(update: Mapping[str, Tensor], keep: float) -> dict[str, Tensor]:
    """Keep the `keep` fraction of largest-magnitude entries of every tensor, zero the rest."""
    out = {}
    for name, g in update.items():
        k = max(1, int(round(keep * g.numel())))
        threshold = g.abs().flatten().kthvalue(g.numel() - k + 1).values
        out[name] = torch.where(g.abs() >= threshold, g, torch.zeros_like(g))
    return out


def gaussian_noise(update: Mapping[str, Tensor], scale: float, gen: torch.Generator) -> dict[str, Tensor]:
    """Add N(0, sigma^2) to every coordinate, sigma = scale * RMS of the whole update."""
    flat = torch.cat([g.flatten() for g in update.values()])
    sigma = scale * float(flat.pow(2).mean().sqrt())
    return {k: g + sigma * torch.randn(g.shape, generator=gen).to(g) for k, g in update.items()}


DEFENSES: dict[str, Callable[[Mapping[str, Tensor], torch.Generator], dict[str, Tensor]]] = {
    "none": lambda update, gen: dict(update),
    "prune": lambda update, gen: prune(update, keep=0.10),
    "noise": lambda update, gen: gaussian_noise(update, scale=1.0, gen=gen),
}


# --- scoring -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Score:
    """Mean over the batch after Hungarian matching. psnr in dB, ssim in [-1, 1], label_accuracy in [0, 1]."""

    psnr: float
    ssim: float
    label_accuracy: float


def score(data: DataBundle, inputs: Tensor, labels: Tensor | None, truth: Tensor, true_labels: Tensor) -> Score:
    """Score (b, C, H, W) model-space reconstructions against the truth, in pixel space [0, 1]."""
    rec = data.normalization.to_pixels(inputs.detach()).clamp(0, 1)
    ref = data.normalization.to_pixels(truth).clamp(0, 1)
    mse = (rec[:, None] - ref[None]).pow(2).flatten(2).mean(dim=2)  # (b_rec, b_true)
    rows, cols = linear_sum_assignment(mse.numpy())
    psnr = (10 * torch.log10(1 / mse[rows, cols])).mean()
    ssim = structural_similarity_index_measure(rec[rows], ref[cols], data_range=1.0, reduction="none").mean()
    if labels is None:
        accuracy = float("nan")
    else:
        remaining, hits = true_labels.tolist(), 0
        for label in labels.tolist():
            if label in remaining:
                remaining.remove(label)
                hits += 1
        accuracy = hits / len(true_labels)
    return Score(float(psnr), float(ssim), accuracy)


# --- the grid ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    attack: str
    model: str
    batch_size: int
    defense: str
    trial: int
    psnr: float
    ssim: float
    label_accuracy: float
    matching_loss: float
    iterations: int
    seconds: float


def observe(data: DataBundle, model_name: str, batch_size: int, defense: str, trial: int) -> tuple[Observation, Tensor,
                                                                                                   Tensor]:
    """One FedSGD observation of a random batch (labels may repeat), defended; and the true batch."""
    gen = torch.Generator().manual_seed(1000 * batch_size + trial)
    idx = torch.randperm(len(data.train_y), generator=gen)[:batch_size]
    x, y = data.train_x[idx], data.train_y[idx]
    model = build_model({"name": model_name}, SHAPE, data.num_classes, seed=trial)
    gradient = {k: v.detach() for k, v in model_gradients(model, x, y, create_graph=False).items()}
    update = DEFENSES[defense](gradient, gen)
    meta = TrainMeta("fedsgd", SHAPE, data.num_classes, data.normalization, batch_size=batch_size)
    return Observation(0, 0, model.eval(), update, meta), x, y


def bench_attack(name: str, data: DataBundle, *, models: list[str], batch_sizes: list[int], defenses: list[str],
                 trials: int, time_budget: float | None, knobs: Mapping[str, object] | None = None,
                 log: Callable[[str], None] = print) -> list[Row]:
    """Run the registered attack `name` over the grid; the hook through which any attack (e.g. `gismn`) joins the
    table. knobs: overrides of the attack's defaults; time_budget is passed when its config has that knob."""
    knob_names = {f.name for f in fields(ATTACKS.get(name).Config)}
    rows = []
    for model_name in models:
        for b in batch_sizes:
            for defense in defenses:
                for trial in range(trials):
                    obs, x, y = observe(data, model_name, b, defense, trial)
                    node = {"name": name, **(knobs or {})}
                    if time_budget is not None and "time_budget" in knob_names:
                        node["time_budget"] = time_budget
                    attack = build_attack(node)
                    start = time.perf_counter()
                    rec = attack.reconstruct(obs)
                    seconds = time.perf_counter() - start
                    s = score(data, rec.inputs, rec.labels, x, y)
                    row = Row(name, model_name, b, defense, trial, s.psnr, s.ssim, s.label_accuracy,
                              float(rec.matching_loss) if rec.matching_loss is not None else float("nan"),
                              int(rec.stats.get("iterations", -1)), seconds)
                    log(json.dumps(asdict(row)))
                    rows.append(row)
    return rows


# --- overhead of the attack loop ---------------------------------------------------------------------------------

def bare_ig_iteration_ms(model: torch.nn.Module, target: Mapping[str, Tensor], labels: Tensor, lower: Tensor,
                         upper: Tensor, iterations: int, tv_weight: float) -> float:
    """The IG computation written as a bare PyTorch loop: ms per iteration.

    Written as one would by hand with the same care: module call, autograd.grad on the parameters, backward into
    the candidate only (backward(inputs=[x]), as `invert` does), MultiStepLR, clamp to the box.
    """
    model = copy.deepcopy(model)
    params = list(model.parameters())
    targets = [target[n] for n, _ in model.named_parameters()]
    target_norm = torch.sqrt(sum(t.pow(2).sum() for t in targets))
    x = torch.randn(labels.shape[0], *SHAPE).clamp(lower, upper).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1)
    milestones = [iterations * 3 // 8, iterations * 5 // 8, iterations * 7 // 8]
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    start = time.perf_counter()
    for _ in range(iterations):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, targets))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        tv = (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
        (1 - dot / (norm * target_norm) + tv_weight * tv).backward(inputs=[x])
        x.grad.sign_()
        opt.step()
        schedule.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, upper), lower))
    return (time.perf_counter() - start) / iterations * 1e3


def overhead(data: DataBundle, model_name: str, batch_size: int, iterations: int, repeats: int) -> dict[str, float]:
    """Median ms per iteration of `inverting` (invert() on a prepared problem) and of the bare loop, interleaved."""
    obs, _, _ = observe(data, model_name, batch_size, "none", 0)
    attack = build_attack({"name": "inverting", "iterations": iterations})
    problem, _ = attack.problem(obs)
    settings = attack.settings()
    lower, upper = pixel_box(data.normalization, SHAPE)
    ours, bare = [], []
    invert(problem, settings)  # warm-up: first use of torch.func imports and caches
    bare_ig_iteration_ms(obs.model, obs.update, problem.labels, lower, upper, 10, settings.tv_weight)
    for _ in range(repeats):
        ours.append(invert(problem, settings).seconds / iterations * 1e3)
        bare.append(bare_ig_iteration_ms(obs.model, obs.update, problem.labels, lower, upper, iterations,
                                         settings.tv_weight))
    return {"ours_ms": statistics.median(ours), "bare_ms": statistics.median(bare),
            "ratio": statistics.median(ours) / statistics.median(bare), "ratio_of_minima": min(ours) / min(bare),
            "ours_all": ours, "bare_all": bare}


# --- FedAvg: replaying local steps against matching one gradient -----------------------------------------------

FEDAVG_MODEL = {"name": "cnn", "channels": [16, 32], "hidden": 128}


@dataclass(frozen=True)
class FedAvgRow:
    local_steps: int
    lr: float
    batch_size: int
    trial: int
    variant: str  # "unrolled" or "plain"
    psnr: float
    ssim: float
    matching_loss: float
    iterations: int
    seconds: float


def fedavg_rows(data: DataBundle, *, steps: list[int], lrs: list[float], batch_size: int, trials: int,
                time_budget: float, log: Callable[[str], None] = print) -> list[FedAvgRow]:
    """A FedAvg client takes `local_steps` SGD steps on one batch; `inverting` attacks its weight delta with and
    without replaying the steps, each with the same time budget (the replay costs ~local_steps x per iteration)."""
    rows = []
    for local_steps in steps:
        for lr in lrs:
            for trial in range(trials):
                gen = torch.Generator().manual_seed(7000 + trial)
                idx = torch.randperm(len(data.train_y), generator=gen)[:batch_size]
                x, y = data.train_x[idx], data.train_y[idx]
                model = build_model(FEDAVG_MODEL, SHAPE, data.num_classes, seed=trial)
                local = copy.deepcopy(model)
                opt = torch.optim.SGD(local.parameters(), lr=lr)
                for _ in range(local_steps):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(local(x), y).backward()
                    opt.step()
                after = dict(local.named_parameters())
                delta = {k: (after[k] - p).detach() for k, p in model.named_parameters()}
                meta = TrainMeta("fedavg", SHAPE, data.num_classes, data.normalization, batch_size=batch_size,
                                 local_steps=local_steps, lr=lr, num_examples=batch_size)
                obs = Observation(0, 0, model.eval(), delta, meta)
                for variant, unroll in (("unrolled", "on"), ("plain", "off")):
                    attack = build_attack({"name": "inverting", "unroll": unroll, "iterations": 10**6,
                                           "time_budget": time_budget})
                    rec = attack.reconstruct(obs)
                    s = score(data, rec.inputs, rec.labels, x, y)
                    row = FedAvgRow(local_steps, lr, batch_size, trial, variant, s.psnr, s.ssim,
                                    float(rec.matching_loss), int(rec.stats["iterations"]), float(rec.stats["seconds"]))
                    log(json.dumps(asdict(row)))
                    rows.append(row)
    return rows


def fedavg_table(rows: list[FedAvgRow]) -> str:
    groups: dict[tuple, dict[str, list[FedAvgRow]]] = {}
    for r in rows:
        groups.setdefault((r.local_steps, r.lr), {}).setdefault(r.variant, []).append(r)
    lines = ["| local steps | lr | unrolled PSNR dB | plain PSNR dB | unrolled SSIM | plain SSIM | unrolled loss "
             "| plain loss | unrolled it. | plain it. | n |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (local_steps, lr), v in groups.items():
        mean = lambda variant, f: statistics.fmean(getattr(r, f) for r in v[variant])  # noqa: E731
        lines.append(f"| {local_steps} | {lr:g} | {mean('unrolled', 'psnr'):.1f} | {mean('plain', 'psnr'):.1f} | "
                     f"{mean('unrolled', 'ssim'):.3f} | {mean('plain', 'ssim'):.3f} | "
                     f"{mean('unrolled', 'matching_loss'):.3g} | {mean('plain', 'matching_loss'):.3g} | "
                     f"{mean('unrolled', 'iterations'):.0f} | {mean('plain', 'iterations'):.0f} | "
                     f"{len(v['unrolled'])} |")
    return "\n".join(lines)


# --- report ------------------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} intra-op "
            f"thread(s), Python {platform.python_version()}")


def table(rows: list[Row]) -> str:
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.attack, r.model, r.batch_size, r.defense), []).append(r)
    lines = ["| attack | model | b | defense | PSNR dB | SSIM | label acc. | matching loss | iterations | seconds "
             "| n |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (attack, model, b, defense), rs in groups.items():
        mean = lambda f: statistics.fmean(getattr(r, f) for r in rs)  # noqa: E731
        lines.append(f"| {attack} | {model} | {b} | {defense} | {mean('psnr'):.1f} | {mean('ssim'):.3f} | "
                     f"{mean('label_accuracy'):.2f} | {mean('matching_loss'):.3g} | {mean('iterations'):.0f} | "
                     f"{mean('seconds'):.1f} | {len(rs)} |")
    return "\n".join(lines)


def write_section(path: Path, body: str, heading: str = SECTION) -> None:
    """Replace (or append) the section of BENCHMARKS.md that starts with the line `heading`."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + body + ("" if end < 0 else text[end:])
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("grid", "fedavg"), default="grid",
                        help="grid: attacks x b x defenses and the loop overhead; fedavg: unrolled vs plain matching")
    parser.add_argument("--attacks", default="dlg,inverting", help="registered attack names, comma-separated")
    parser.add_argument("--models", default="lenet,cnn", help="fedsim model names (untrained)")
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--defenses", default=",".join(DEFENSES))
    parser.add_argument("--trials", type=int, default=3, help="batches per cell (different images and model seeds)")
    parser.add_argument("--time-budget", type=float, default=120.0, help="seconds per reconstruction (<= 0: none)")
    parser.add_argument("--overhead-iterations", type=int, default=200)
    parser.add_argument("--overhead-repeats", type=int, default=5)
    parser.add_argument("--reduced", action="store_true",
                        help="1 trial, 45 s per reconstruction, 3 overhead repeats (what BENCHMARKS.md records)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write every row here")
    args = parser.parse_args(argv)
    if args.reduced:
        args.trials, args.time_budget, args.overhead_repeats = 1, 45.0, 3
    torch.set_num_threads(args.threads)
    data = load_dataset({"name": "patches", "size": 32, "channels": 3})
    split = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    budget = args.time_budget if args.time_budget > 0 else None
    command = "PYTHONPATH=. python benchmarks/attacks_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.part == "fedavg":
        fedavg(args, data, command.strip())
        return

    started = time.perf_counter()
    cost = {name: overhead(data, name, 1, args.overhead_iterations, args.overhead_repeats)
            for name in ("lenet", "cnn")}
    print(json.dumps(cost), flush=True)
    rows: list[Row] = []
    for name in split(args.attacks):
        rows += bench_attack(name, data, models=split(args.models), batch_sizes=[int(b) for b in
                             split(args.batch_sizes)], defenses=split(args.defenses), trials=args.trials,
                             time_budget=budget, log=lambda line: print(line, flush=True))
    total = time.perf_counter() - started

    overhead_lines = "\n".join(
        f"| {model} | {c['ours_ms']:.2f} | {c['bare_ms']:.2f} | {100 * (c['ratio'] - 1):+.1f} % | "
        f"{100 * (c['ratio_of_minima'] - 1):+.1f} % |"
        for model, c in cost.items())
    body = f"""{SECTION}

Machine: {machine()}. Command: `{command.strip()}` ({total / 60:.0f} min, shared machine: timings are noisy).
Data: 32x32 RGB `patches` (8 classes, labels may repeat within a batch); untrained models (`lenet`: DLG's sigmoid
LeNet, U(-0.5, 0.5) init; `cnn`: conv-conv-FC-FC ReLU). FedSGD gradient of one batch; defenses applied to it:
`prune` keeps the top 10 % of each tensor, `noise` adds Gaussian noise with sigma = RMS of the gradient (SNR 1).
Each attack runs with its defaults (DLG: 3000 L-BFGS iterations, euclidean, joint labels; inverting: 1000 signed
Adam steps, cosine, TV 1e-2, analytic labels, masked cosine switched on automatically under pruning) and at most
{args.time_budget:g} s per reconstruction. PSNR and SSIM (torchmetrics, data_range 1) per image in [0, 1] pixel
space after a Hungarian assignment on MSE, averaged; label accuracy counts each true label once.

{table(rows)}

Per-iteration time of Inverting Gradients (`invert` on a prepared problem, b = 1) against a bare PyTorch loop doing
the same computation (cross-entropy, double backward, global cosine, TV, signed Adam, MultiStep schedule, box),
median of {args.overhead_repeats} interleaved runs of {args.overhead_iterations} iterations, one thread:

| model | inverting ms/it | bare loop ms/it | difference of medians | difference of minima |
|---|---|---|---|---|
{overhead_lines}
"""
    write_section(args.out, body)
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "overhead": cost}, indent=1))
    print(body)


def fedavg(args: argparse.Namespace, data: DataBundle, command: str) -> None:
    """The FedAvg part: writes its own section of BENCHMARKS.md."""
    budget = args.time_budget if args.time_budget > 0 else 20.0
    if args.reduced:
        args.trials, budget = 2, 20.0
    started = time.perf_counter()
    rows = fedavg_rows(data, steps=[2, 5], lrs=[0.05, 0.2], batch_size=1, trials=args.trials, time_budget=budget,
                       log=lambda line: print(line, flush=True))
    total = time.perf_counter() - started
    heading = SECTION + ": FedAvg local steps"
    body = f"""{heading}

Machine: {machine()}. Command: `{command}` ({total / 60:.0f} min, shared machine).
A FedAvg client holding one 32x32 patch takes `local steps` plain SGD steps at step size `lr` on the untrained small
CNN (conv 16-32, FC 128) and sends its weight delta. `inverting` attacks it with the steps replayed differentiably
(`unroll=on`, matching the delta) and without (`unroll=off`, matching -delta/lr as if it were one gradient), each
with the same {budget:g} s budget, so plain matching gets several times more iterations. Means over {args.trials}
images (different model seeds); PSNR / SSIM as above.

{fedavg_table(rows)}
"""
    write_section(args.out, body, heading)
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows]}, indent=1))
    print(body)


if __name__ == "__main__":
    main()
