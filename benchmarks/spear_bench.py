"""SPEAR benchmark: time, samples drawn and exact-recovery rate over batch size x width x input dimension.

Data are natural-image patches at the input dimension (784 = 28x28 grey, 3072 = 32x32 RGB crops of the photographs
bundled with scikit-image/scikit-learn, normalised per channel): real, correlated images, the hard case for SPEAR
(fewer zeros per column than Gaussian inputs), with no download. Each trial draws a fresh untrained FC network
(one hidden ReLU layer of the given width, PyTorch's default init, seed = trial) and a fresh batch of distinct,
linearly independent crops (identical crops cannot be told apart by any attack; redraws are counted), computes the
FedSGD gradient of the mean cross-entropy by autograd in float32, and runs `fedsim.attacks.spear.reconstruct` with the
cell's budget. "Exact" means every sample is recovered with relative L2 error <= 1e-3 after Hungarian matching.

`paper_expected` is the expected number of (b-1)-row proposals that the paper's uniform sampling would need for the
batch (coupon collector over the true zero counts z_i of the columns of dL/dZ among the m' active rows, with
p_i = C(z_i, b-1) / C(m', b-1)); it explains the cost of a batch independently of this implementation.

    python benchmarks/spear_bench.py --quick
    python benchmarks/spear_bench.py --trials 5 --out benchmarks/results/spear
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.attacks.spear import reconstruct  # noqa: E402
from fedsim.data import load_dataset  # noqa: E402
from fedsim.models import build_model  # noqa: E402

DATA = {784: {"name": "patches", "size": 28, "channels": 1}, 3072: {"name": "patches", "size": 32, "channels": 3}}
FULL = {"b": [2, 4, 8, 12, 16, 20, 24], "widths": [200, 1000, 2000], "dims": [784, 3072]}
QUICK = {"b": [2, 8, 16], "widths": [200, 1000], "dims": [784]}


def machine() -> dict[str, object]:
    """CPU model, core count, threads and load: timings mean little without them."""
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "load_avg": os.getloadavg()}


def draw_batch(data, b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """b distinct crops with linearly independent inputs; returns (x, y, redraws)."""
    redraws = 0
    while True:
        idx = torch.randperm(len(data.train_x), generator=gen)[:b]
        x = data.train_x[idx]
        s = torch.linalg.svdvals(x.flatten(1).double())
        if s[-1] > 1e-6 * s[0]:
            return x, data.train_y[idx], redraws
        redraws += 1


def matched_errors(recovered: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    rec, true = recovered.double(), truth.double().flatten(1)
    cost = torch.cdist(true, rec) / true.norm(dim=1, keepdim=True)
    rows, cols = linear_sum_assignment(cost.numpy())
    return cost[rows, cols]


def paper_expected(zeros: list[int], active: int, b: int) -> float:
    """E[proposals] for uniform (b-1)-row sampling to hit every column once (coupon collector, unequal p_i)."""
    def p_hit(z: int) -> float:
        if z < b - 1:
            return 0.0
        return math.exp(math.lgamma(z + 1) - math.lgamma(z - b + 2) - math.lgamma(active + 1) + math.lgamma(active - b + 2))

    p = [p_hit(z) for z in zeros]
    if min(p) == 0.0:
        return math.inf
    # E[max_i T_i], T_i ~ Exp(p_i): integral of 1 - prod_i (1 - exp(-p_i t)), on a log grid.
    lo, hi = 1e-3 / max(p), 60.0 / min(p)
    grid = torch.logspace(math.log10(lo), math.log10(hi), 4000, dtype=torch.float64)
    pt = torch.tensor(p, dtype=torch.float64)
    f = 1 - torch.prod(1 - torch.exp(-pt[:, None] * grid[None, :]), dim=0)
    return float(torch.trapezoid(f, grid) + lo)


def trial(dim: int, width: int, b: int, t: int, budget: dict, deflate: bool, solver: str = "auto"
          ) -> dict[str, object]:
    data = load_dataset(DATA[dim])
    model = build_model({"name": "fc", "widths": [width]}, data.input_shape, data.num_classes, seed=t)
    gen = torch.Generator().manual_seed(1000 * b + t)
    x, y, redraws = draw_batch(data, b, gen)
    layer = model.net[1]
    z = layer(x.flatten(1))
    z.retain_grad()
    model.zero_grad()
    F.cross_entropy(model.net[3](F.relu(z)), y).backward()
    g_true = z.grad.T                                                  # (m, b) dL/dZ, for the cost model only
    active = g_true.ne(0).any(dim=1)
    zeros = g_true[active].eq(0).sum(dim=0).tolist()
    cpu = time.process_time()
    result = reconstruct(layer.weight, layer.bias, layer.weight.grad, layer.bias.grad, b, seed=t, deflate=deflate,
                         max_samples=budget["max_samples"], max_seconds=budget["max_seconds"], solver=solver)
    cpu = time.process_time() - cpu
    err = float(matched_errors(result.inputs, x).max())
    return {"dim": dim, "width": width, "b": b, "solver": solver, "solver_ran": result.solver, "trial": t,
            "seconds": result.seconds, "cpu_seconds": cpu,
            "samples": result.samples,
            "proposals": result.proposals, "certified": result.certified, "exact": err <= 1e-3, "max_rel_err": err,
            "stage": result.stage, "candidates": result.candidates, "redraws": redraws,
            "active_rows": int(active.sum()), "min_zero_fraction": min(zeros) / max(1, int(active.sum())),
            "paper_expected": paper_expected(zeros, int(active.sum()), b)}


def budget_for(b: int, args) -> dict:
    """Per-cell budget: --max-seconds caps every trial; b >= 24 gets --max-seconds-24."""
    secs = args.max_seconds_24 if b >= 24 else args.max_seconds
    return {"max_seconds": secs, "max_samples": args.max_samples}


def summarise(rows: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["dim"], r["width"], r["b"], r.get("solver", "auto")), []).append(r)
    out = []
    for (dim, width, b, solver), rs in sorted(cells.items()):
        secs = sorted(r["seconds"] for r in rs)
        out.append({
            "dim": dim, "width": width, "b": b, "solver": solver, "trials": len(rs),
            "median_s": statistics.median(secs), "p90_s": secs[min(len(secs) - 1, math.ceil(0.9 * len(secs)) - 1)],
            "max_s": max(secs),
            "median_cpu_s": statistics.median(r.get("cpu_seconds", math.nan) for r in rs),
            "median_samples": statistics.median(r["samples"] for r in rs),
            "samples_per_s": sum(r["samples"] for r in rs) / max(sum(secs), 1e-9),
            "exact_rate": sum(r["exact"] for r in rs) / len(rs),
            "certified_rate": sum(r["certified"] for r in rs) / len(rs),
            "false_certificates": sum(r["certified"] and not r["exact"] for r in rs),
            "median_paper_expected": statistics.median(r["paper_expected"] for r in rs),
            "median_min_zero_fraction": statistics.median(r["min_zero_fraction"] for r in rs)})
    return out


def markdown(summary: list[dict]) -> str:
    head = ("| input dim | width | b | solver | trials | median s | p90 s | max s | median CPU s | median samples "
            "| samples/s | exact | certified | paper-expected proposals (median) | min zero fraction (median) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {c['dim']} | {c['width']} | {c['b']} | {c['solver']} | {c['trials']} | {c['median_s']:.2f} "
             f"| {c['p90_s']:.2f} | {c['max_s']:.2f} "
             f"| {c['median_cpu_s']:.2f} "
             f"| {c['median_samples']:.3g} | {c['samples_per_s']:.3g} | {c['exact_rate']:.0%} "
             f"| {c['certified_rate']:.0%} | {c['median_paper_expected']:.3g} | {c['median_min_zero_fraction']:.3f} |"
             for c in summary]
    best: dict[tuple, int] = {}
    for c in summary:
        if c["exact_rate"] >= 0.9:
            key = (c["dim"], c["width"], c["solver"])
            best[key] = max(best.get(key, 0), c["b"])
    footer = "".join(f"\nLargest b with >= 90% of trials exact: {b} (input dim {k[0]}, width {k[1]}, {k[2]})"
                     for k, b in sorted(best.items()))
    return head + "\n".join(lines) + "\n" + footer + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid, 2 trials (a smoke run)")
    parser.add_argument("--b", type=int, nargs="+", help="batch sizes (default: 2 4 8 12 16 20 24)")
    parser.add_argument("--widths", type=int, nargs="+", help="hidden widths (default: 200 1000 2000)")
    parser.add_argument("--dims", type=int, nargs="+", choices=sorted(DATA), help="input dims (default: 784 3072)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--trials-24", type=int, default=None, help="trials for b >= 24 (default: --trials)")
    parser.add_argument("--first-trial", type=int, default=0,
                        help="trial number to start at (split a grid over processes, then --merge their trials)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per-trial wall-clock budget")
    parser.add_argument("--max-seconds-24", type=float, default=600.0, help="per-trial budget for b >= 24")
    parser.add_argument("--max-samples", type=int, default=100_000_000)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-deflate", action="store_true", help="the paper's uniform sampling only")
    parser.add_argument("--solvers", nargs="+", default=["auto"], choices=["auto", "sampling", "dictionary"],
                        help="solver axis (attack.solver)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/spear"))
    parser.add_argument("--merge", type=Path, nargs="+", help="only summarise these trials.jsonl files into --out")
    args = parser.parse_args(argv)
    if args.merge:
        rows = [json.loads(line) for path in args.merge for line in path.read_text().splitlines() if line.strip()]
        write_summary(rows, {"merged": [str(p) for p in args.merge]}, args.out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = dict(QUICK if args.quick else FULL)
    trials = 2 if args.quick else args.trials
    for key in ("b", "widths", "dims"):
        if getattr(args, key):
            grid[key] = getattr(args, key)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    info = {"machine": machine(), "command": command, "deflate": not args.no_deflate,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(info, indent=1), flush=True)
    rows: list[dict] = []
    log = (args.out / "trials.jsonl").open("w")
    for dim in grid["dims"]:
        for width in grid["widths"]:
            for b in grid["b"]:
                if b >= min(width, dim):
                    continue
                n = (args.trials_24 or trials) if b >= 24 else trials
                for solver, t in ((solver, t) for solver in args.solvers
                                   for t in range(args.first_trial, args.first_trial + n)):
                    r = trial(dim, width, b, t, budget_for(b, args), not args.no_deflate, solver)
                    rows.append(r)
                    log.write(json.dumps(r) + "\n")
                    log.flush()
                    print(f"dim={dim} width={width} b={b} {solver} t={t}: {r['seconds']:.2f}s samples={r['samples']} "
                          f"exact={r['exact']} certified={r['certified']} paper_expected={r['paper_expected']:.3g}",
                          flush=True)
    info["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    info["load_avg_end"] = os.getloadavg()
    write_summary(rows, info, args.out)


def write_summary(rows: list[dict], info: dict, out: Path) -> None:
    """summary.md (table), summary.csv and summary.json (with the run's machine and command) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    table = markdown(summary)
    header = f"Machine: {info.get('machine', '')}\n\nCommand: `{info.get('command', info.get('merged', ''))}`\n\n"
    (out / "summary.md").write_text(header + table)
    (out / "summary.json").write_text(json.dumps({"info": info, "cells": summary}, indent=1))
    with (out / "summary.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    print(table)


if __name__ == "__main__":
    main()
