"""GI-SMN-style against Inverting Gradients with the same budget: gradient evaluations and restarts matched.

    PYTHONPATH=. python benchmarks/gismn_vs_ig.py                      # 8 victims, no defense and 90 % pruning
    PYTHONPATH=. python benchmarks/gismn_vs_ig.py --victims 16 --steps 50,400,100 --restarts 2
    PYTHONPATH=. python benchmarks/gismn_vs_ig.py --victims 4 --out a.json &       # split over two cores, then
    PYTHONPATH=. python benchmarks/gismn_vs_ig.py --victims 8 --first 4 --out b.json; \
        python benchmarks/gismn_vs_ig.py --merge a.json b.json

Each attack gets R restarts of T optimiser steps, each step one evaluation of the matching loss's gradient on
every restart: GI-SMN-style's T is its three stages together (z search, W+ refinement, pixel polish), IG runs T
iterations per restart. Both return the restart with the lowest matching loss. Victims: `patches` 32x32 RGB test
images (seeded picks), one per attack (B = 1), against the untrained fedsim `cnn`; defenses: none, and per-tensor
magnitude pruning keeping 10 % of every gradient tensor (both attacks then match only the observed non-zeros).
The prior is the default one (600 steps on the bundled auxiliary photographs; trained and cached if missing).
PSNR (dB, pixels in [0, 1]) per victim, its mean, standard deviation and the paired difference; results to
benchmarks/results/gismn_vs_ig.json and the "GI-SMN-style vs Inverting Gradients, same budget" section of
BENCHMARKS.md (written by hand from the printed table).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.attacks.base import build_attack  # noqa: E402
from fedsim.attacks.gismn import GISMN, GISMNConfig  # noqa: E402
from fedsim.attacks.matching import model_gradients  # noqa: E402
from fedsim.data import load_dataset  # noqa: E402
from fedsim.metrics import psnr  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.threat import Observation, TrainMeta  # noqa: E402


def prune(gradient: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """Per-tensor magnitude pruning: keep the top `keep` share of |g| in every tensor, zero the rest."""
    out = {}
    for name, g in gradient.items():
        k = max(1, round(keep * g.numel()))
        threshold = g.abs().flatten().kthvalue(g.numel() - k + 1).values
        out[name] = torch.where(g.abs() >= threshold, g, torch.zeros_like(g))
    return out


def victims(count: int) -> list[int]:
    """`count` seeded picks from the test split (the first two are tests/test_gismn.py's)."""
    data = load_dataset({"name": "patches", "size": 32, "channels": 3})
    n = len(data.test_y)
    return [int(torch.randperm(n, generator=torch.Generator().manual_seed(100 + v))[0]) for v in range(count)]


DEFENSES = ("none", "prune 90%")


def run(count: int, steps: tuple[int, int, int], restarts: int, prior_steps: int,
        defenses: tuple[str, ...] = DEFENSES, first: int = 0) -> dict:
    torch.set_num_threads(1)
    data = load_dataset({"name": "patches", "size": 32, "channels": 3})
    model = build_model({"name": "cnn"}, (3, 32, 32), data.num_classes, seed=0).eval()
    meta = TrainMeta("fedsgd", (3, 32, 32), data.num_classes, data.normalization, batch_size=1)
    budget = sum(steps)
    gismn = GISMN(GISMNConfig(restarts=restarts, stage1_iterations=steps[0], stage2_iterations=steps[1],
                              stage3_iterations=steps[2], prior_steps=prior_steps, progress=True))
    inverting = build_attack({"name": "inverting", "iterations": budget, "restarts": restarts})
    rows = []
    for idx in victims(count)[first:]:
        x, y = data.test_x[idx:idx + 1], data.test_y[idx:idx + 1]
        truth = data.normalization.to_pixels(x)
        dense = {k: v.detach() for k, v in model_gradients(model, x, y, create_graph=False).items()}
        for defense, gradient in (("none", dense), ("prune 90%", prune(dense, 0.1))):
            if defense not in defenses:
                continue
            row = {"victim": idx, "label": int(y), "defense": defense}
            for name, attack in (("gismn", gismn), ("inverting", inverting)):
                start = time.perf_counter()
                rec = attack.reconstruct(Observation(0, 0, model, gradient, meta))
                row[f"{name}_seconds"] = time.perf_counter() - start
                pixels = data.normalization.to_pixels(rec.inputs).clamp(0, 1)
                row[f"{name}_psnr"] = float(psnr(pixels, truth).mean())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"victims": count, "restarts": restarts, "steps": list(steps), "gradient_evaluations": restarts * budget,
            "prior_steps": prior_steps, "machine": platform.platform(), "torch_threads": 1, "rows": rows}


def table(result: dict) -> str:
    lines = ["| defense | IG PSNR dB (mean ± sd) | GI-SMN-style PSNR dB | GI-SMN - IG (mean ± sd) | GI-SMN better on | "
             "s per attack (IG / GI-SMN) |", "|---|---|---|---|---|---|"]
    for defense in DEFENSES:
        rows = [r for r in result["rows"] if r["defense"] == defense]
        if not rows:
            continue
        ig = [r["inverting_psnr"] for r in rows]
        gs = [r["gismn_psnr"] for r in rows]
        diff = [g - i for g, i in zip(gs, ig)]

        def ms(values: list[float]) -> str:
            return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0:.1f}"

        wins = sum(d > 0 for d in diff)
        seconds = (f"{statistics.mean(r['inverting_seconds'] for r in rows):.0f} / "
                   f"{statistics.mean(r['gismn_seconds'] for r in rows):.0f}")
        lines.append(f"| {defense} | {ms(ig)} | {ms(gs)} | {ms(diff)} | {wins} of {len(rows)} | {seconds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victims", type=int, default=8)
    parser.add_argument("--steps", default="50,300,100", help="GI-SMN's stage 1, 2, 3 steps; IG runs their sum")
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--prior-steps", type=int, default=600)
    parser.add_argument("--defenses", default="none,prune 90%", help="comma-separated: none, prune 90%%")
    parser.add_argument("--first", type=int, default=0, help="skip the first victims (to split a run in parts)")
    parser.add_argument("--merge", nargs="*", default=[], help="only print the table of these result files")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gismn_vs_ig.json"))
    args = parser.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        result = {**parts[0], "rows": [r for p in parts for r in p["rows"]]}
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"{len(result['rows'])} rows; budget: {result['restarts']} restarts x {sum(result['steps'])} "
              "gradient evaluations each, both attacks")
        print(table(result))
        return 0
    steps = tuple(int(s) for s in args.steps.split(","))
    result = run(args.victims, steps, args.restarts, args.prior_steps, tuple(args.defenses.split(",")),
                 args.first)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"budget: {args.restarts} restarts x {sum(steps)} gradient evaluations each, both attacks")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
