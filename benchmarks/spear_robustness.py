"""SPEAR against what defenses and training do to an update: DP-style noise, several local steps, aggregates.

The demo's setting: 32x32 RGB natural-image crops (scikit-image/scikit-learn photographs), the `fc` model (first
layer 3072 -> 1000, then 256, ReLU), batches of 8 per client and step, float32 autograd gradients of the mean
cross-entropy. Three axes, each with `--trials` seeds (a fresh batch per trial; the model is seed 0):

* noise: clip to L2 norm 1, then Gaussian noise of std sigma (the `noise` defense), sigma in 0 .. 1e-2;
* local steps: plain SGD (lr 0.1) over T distinct batches of 4; the server attacks -delta / lr, told the batch
  size, steps and examples (distinct samples = 4 T);
* clients: the mean of k clients' FedSGD gradients (a secure aggregate without quantisation), b = 8 k.

PSNR/SSIM/exact from `fedsim.metrics.score` in pixel space (matched; PSNR capped at 100 dB). `--baseline FILE`
runs the same cases with another implementation of `reconstruct` (e.g. today's main, saved to a file) beside it.

    python benchmarks/spear_robustness.py --trials 3 --out benchmarks/results/spear_robustness
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.attacks.spear import distinct_samples, reconstruct  # noqa: E402
from fedsim.defenses.noise import clip_update, gaussian_noise  # noqa: E402
from fedsim.data import load_dataset  # noqa: E402
from fedsim.metrics import score  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.threat import TrainMeta  # noqa: E402

SIGMAS = [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
STEPS = [1, 2, 5]
CLIENTS = [1, 2, 4]


def gradient(model, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def cases(kind: str, trial: int, data, model):
    """(label, weight, bias, dW, db, b, truth, extra kwargs) for one trial of one axis."""
    gen = torch.Generator().manual_seed(100 + trial)
    layer = model.net[1]
    if kind == "noise":
        for sigma in SIGMAS:
            idx = torch.randperm(len(data.train_x), generator=gen)[:8]
            x, y = data.train_x[idx], data.train_y[idx]
            g = clip_update(gradient(model, x, y), 1.0)
            if sigma:
                g = gaussian_noise(g, sigma, torch.Generator().manual_seed(trial))
            yield f"sigma={sigma:g}", g["net.1.weight"], g["net.1.bias"], 8, x, {}
    elif kind == "steps":
        for steps in STEPS:
            idx = torch.randperm(len(data.train_x), generator=gen)[:4 * steps]
            x, y = data.train_x[idx], data.train_y[idx]
            local = copy.deepcopy(model)
            opt = torch.optim.SGD(local.parameters(), lr=0.1)
            for t in range(steps):
                opt.zero_grad()
                F.cross_entropy(local(x[4 * t:4 * t + 4]), y[4 * t:4 * t + 4]).backward()
                opt.step()
            dW = -(local.net[1].weight - layer.weight).detach() / 0.1
            db = -(local.net[1].bias - layer.bias).detach() / 0.1
            meta = TrainMeta("fedavg", data.input_shape, data.num_classes, batch_size=4, local_steps=steps, lr=0.1,
                             num_examples=4 * steps)
            after = {"weight_after": local.net[1].weight.detach(), "bias_after": local.net[1].bias.detach()}
            yield f"steps={steps}", dW, db, distinct_samples(meta), x, (after if steps > 1 else {})
    else:
        for k in CLIENTS:
            idx = torch.randperm(len(data.train_x), generator=gen)[:8 * k]
            x, y = data.train_x[idx], data.train_y[idx]
            grads = [gradient(model, x[8 * i:8 * i + 8], y[8 * i:8 * i + 8]) for i in range(k)]
            mean = {n: sum(g[n] for g in grads) / k for n in grads[0]}
            yield f"clients={k}", mean["net.1.weight"], mean["net.1.bias"], 8 * k, x, {}


def run(impl, kind: str, trials: int, args, data, model, label: str) -> list[dict]:
    rows = []
    layer = model.net[1]
    for trial in range(trials):
        for name, dW, db, b, x, extra in cases(kind, trial, data, model):
            kwargs = dict(max_samples=args.max_samples, max_seconds=args.max_seconds, seed=trial)
            if label != "baseline":
                kwargs.update(extra)
            elif kind == "steps":
                b = 4                                           # today's main attacks the per-step batch size
            start = time.perf_counter()
            result = impl(layer.weight, layer.bias, dW, db, b, **kwargs)
            seconds = time.perf_counter() - start
            rec = result.inputs.float().reshape(-1, *data.input_shape)
            s = score(data.normalization.to_pixels(rec), data.normalization.to_pixels(x))
            row = {"impl": label, "axis": kind, "case": name, "trial": trial, "psnr": s.psnr, "ssim": s.ssim,
                   "exact": s.exact, "certified": result.certified, "seconds": round(seconds, 2),
                   "stop": getattr(result, "stop_reason", ""), "solver": getattr(result, "solver", "sampling")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    impls = sorted({r["impl"] for r in rows}, reverse=True)
    keys = list(dict.fromkeys((r["axis"], r["case"]) for r in rows))
    head = "| axis | case | " + " | ".join(f"{i}: PSNR dB / exact / certified / s" for i in impls) + " |\n"
    head += "|---|---|" + "---|" * len(impls) + "\n"
    lines = []
    for axis, case in keys:
        cells = []
        for impl in impls:
            rs = [r for r in rows if r["impl"] == impl and r["axis"] == axis and r["case"] == case]
            if not rs:
                cells.append("-")
                continue
            cells.append(f"{statistics.median(r['psnr'] for r in rs):.1f} / "
                         f"{statistics.mean(r['exact'] for r in rs):.0%} / "
                         f"{sum(r['certified'] for r in rs)}/{len(rs)} / "
                         f"{statistics.median(r['seconds'] for r in rs):.1f}")
        lines.append(f"| {axis} | {case} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--axes", nargs="+", default=["noise", "steps", "clients"])
    parser.add_argument("--max-samples", type=int, default=20_000_000)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="wall-clock safety net per update")
    parser.add_argument("--baseline", type=Path, help="a file holding another spear.py to run beside this one")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/spear_robustness"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset({"name": "patches"})
    model = build_model({"name": "fc"}, data.input_shape, data.num_classes, seed=0)
    impls = [("fedsim", reconstruct)]
    if args.baseline:
        spec = importlib.util.spec_from_file_location("spear_baseline", args.baseline)
        module = importlib.util.module_from_spec(spec)
        sys.modules["spear_baseline"] = module                  # dataclasses look their module up there
        spec.loader.exec_module(module)
        impls.append(("baseline", module.reconstruct))
    rows = [r for axis in args.axes for label, impl in impls for r in run(impl, axis, args.trials, args, data,
                                                                           model, label)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = table(rows)
    (args.out / "summary.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
