"""What DP-style noise leaves of a batch to SPEAR, against what it leaves to an attacker told every sample's output
gradient: the least-squares ceiling, per batch size.

The setting is the demo's (tests/test_spear.py `demo_case`): 32x32 RGB natural-image patches, fedsim's `fc` model
(first layer 3072 -> 1000, untrained), the FedSGD update of one batch clipped as a whole to L2 norm `clip` and
given Gaussian noise of std `sigma * clip` on every coordinate (`defense=noise`, fedsim's client-level mechanism).
For each batch:

- `below edge`: how many of the batch's b singular directions of the noisy first-layer gradient stand less than
  1.1x above the noise's largest singular value (Marchenko-Pastur edge, the true sigma): directions the noise has
  (nearly) swallowed.
- `ceiling`: the mean per-image PSNR of X = argmin ||G X - dW_noisy|| with the TRUE output gradients G (m x b) of
  the clean update (G = dW_clean X^+, exact since the batch has rank b): the least-squares estimate an attacker
  that recovered every sample's output gradient exactly would make. No structure-only attack on this layer does
  better on average (it is the unbiased estimate given G); an image prior (denoising) could.
- `subspace`: the same least squares with the true output gradients projected onto the noisy update's leading
  b-dimensional column space, scaled from the bias gradient (SPEAR's own last step, `disaggregate`, on the true
  directions): what any attack that looks for the columns inside that space, as SPEAR does, gets with every
  direction right. It falls below the ceiling where the noise bends that space away from a sample's column.
- `spear`: fedsim's SPEAR (`reconstruct`, default settings, the sample budget counted) on the same noisy update:
  mean per-image PSNR of its answer (matched to the batch), its stop reason and seconds.

    python benchmarks/spear_noise_ceiling.py --bs 8 16 24 32 --seeds 0 1 2 3 --sigma 1e-4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.attacks.spear import prepare, reconstruct  # noqa: E402
from tests.test_spear import (demo_case, true_directions_inputs,  # noqa: E402  (the tests' setting and batches)
                              true_output_gradients)


def matched_psnr(recon_pixels: torch.Tensor, truth_pixels: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of the best one-to-one matching of reconstructions to true images."""
    mse = ((recon_pixels.clamp(0, 1)[None] - truth_pixels[:, None]) ** 2).flatten(2).mean(2)   # (true, recon)
    rows, cols = linear_sum_assignment(mse.numpy())
    return float((10 * torch.log10(1 / mse[rows, cols].clamp_min(1e-12))).mean())


def one_batch(b: int, seed: int, sigma: float, clip: float) -> dict:
    data, model, x, noisy = demo_case(sigma, b, seed, clip=clip)
    layer = model.net[1]
    dW = noisy["net.1.weight"].double()
    G = true_output_gradients(b, seed, clip=clip)                                        # (m, b)
    m, n = dW.shape
    edge = sigma * clip * (math.sqrt(m - b) + math.sqrt(n - b))
    s = torch.linalg.svdvals(dW)[:b]
    to_pixels = data.normalization.to_pixels
    truth = to_pixels(x)
    ceiling = torch.linalg.lstsq(G, dW).solution                                         # (b, n)
    problem, _, _ = prepare(layer.weight, layer.bias, noisy["net.1.weight"], noisy["net.1.bias"], b)
    subspace, share = true_directions_inputs(problem, G)
    start = time.perf_counter()
    result = reconstruct(layer.weight, layer.bias, noisy["net.1.weight"], noisy["net.1.bias"], b)
    seconds = time.perf_counter() - start
    return {
        "b": b, "seed": seed, "sigma": sigma, "clip": clip,
        "below_edge": int((s <= 1.1 * edge).sum()), "weakest_over_edge": float(s[-1] / edge),
        "ceiling_psnr": matched_psnr(to_pixels(ceiling.float().reshape(x.shape)), truth),
        "subspace_psnr": matched_psnr(to_pixels(subspace.float().reshape(x.shape)), truth),
        "share_in_subspace_min": float(share.min()),
        "spear_psnr": matched_psnr(to_pixels(result.inputs.float().reshape(x.shape)), truth),
        "spear_stop": result.stop_reason, "spear_seconds": round(seconds, 2), "spear_samples": result.samples,
        "noise_limited": result.noise_limited,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bs", type=int, nargs="+", default=[8, 16, 24, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--sigma", type=float, default=1e-4)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None, help="append one line per batch")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| b | seed | directions below 1.1x edge | weakest / edge | ceiling PSNR | subspace PSNR | SPEAR PSNR "
          "| SPEAR stop | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in args.bs:
        for seed in args.seeds:
            row = one_batch(b, seed, args.sigma, args.clip)
            print(f"| {b} | {seed} | {row['below_edge']} | {row['weakest_over_edge']:.2f} | {row['ceiling_psnr']:.1f} "
                  f"| {row['subspace_psnr']:.1f} | {row['spear_psnr']:.1f} | {row['spear_stop']} "
                  f"| {row['spear_seconds']:.1f} |", flush=True)
            if args.json is not None:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
