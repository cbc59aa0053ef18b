"""Which samples the large-batch search's proposals reach once the easy ones are found.

On one batch of `spear_bench.py` (natural-image patches, untrained FC network, its trial's seeds), the columns of
the samples closest to another input are taken as found (the search's late state: its traces show the lonely
samples found last), points are drawn orthogonal to them as `DictionarySearch.round` draws them, and each point
proposes (a) the kernel of its b-1 deepest independent rows (`first_independent_rows`) and (b) the kernel most of
its 4b deepest rows vanish on (`robust_kernels`). Printed: the time of each kind, the proposals that pass the
search's sparsity filter, how many of them are true columns of the samples not yet found, and how many of those
samples they cover.

    python benchmarks/spear_proposals.py --b 64 --width 1000 --found 36 --points 300
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedsim.attacks.spear import prepare  # noqa: E402
from fedsim.attacks.spear.dictionary import (DictionarySearch, complement, deep_rows,  # noqa: E402
                                             first_independent_rows, robust_kernels)
from fedsim.attacks.spear.factorisation import noisy_zero_mask  # noqa: E402
from fedsim.attacks.spear.selection import Candidates  # noqa: E402
from spear_bench import DATA, build_model, draw_batch, load_dataset, machine  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b", type=int, default=64)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=3072, choices=sorted(DATA))
    parser.add_argument("--trial", type=int, default=0)
    parser.add_argument("--found", type=int, default=36, help="samples taken as found (the least lonely)")
    parser.add_argument("--points", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    b, t = args.b, args.trial
    data = load_dataset(DATA[args.dim])
    model = build_model({"name": "fc", "widths": [args.width]}, data.input_shape, data.num_classes, seed=t)
    x, y, _ = draw_batch(data, b, torch.Generator().manual_seed(1000 * b + t))
    layer = model.net[1]
    z = layer(x.flatten(1))
    z.retain_grad()
    model.zero_grad()
    F.cross_entropy(model.net[3](F.relu(z)), y).backward()
    problem, _, _ = prepare(layer.weight, layer.bias, layer.weight.grad, layer.bias.grad, b, seed=t)
    truth = problem.L.T @ z.grad.T.double()
    truth = truth / truth.norm(dim=0, keepdim=True)
    pool = torch.nonzero(problem.row_norm > 0).flatten()
    m = problem.L.shape[0]
    search = DictionarySearch.create(problem, pool, m, max(b - 1, round(0.1 * pool.numel())), Candidates.empty(m, b))
    flat = x.flatten(1).double()
    cos = (flat @ flat.T) / (flat.norm(dim=1)[:, None] * flat.norm(dim=1)[None, :])
    found = torch.argsort(cos.fill_diagonal_(-1).max(1).values, descending=True)[: args.found]
    missing = torch.ones(b, dtype=torch.bool)
    missing[found] = False
    g = torch.Generator().manual_seed(5)
    points = torch.randn(args.points, b, generator=g, dtype=torch.float64)
    if args.found:
        basis, _ = torch.linalg.qr(truth[:, found])
        points = points - (points @ basis) @ basis.T
    spread = torch.exp(2 * torch.rand(args.points, 1, generator=g, dtype=torch.float64) - 1)
    points = points / (points @ problem.R).norm(dim=1, keepdim=True) * search.scale * spread
    print(machine())
    print(f"b={b} width={args.width} trial={t}: {args.found} samples taken as found, {int(missing.sum())} missing, "
          f"{args.points} points")
    start = time.perf_counter()
    rows, negative = deep_rows(search.A, search.offset, points)
    setup = time.perf_counter() - start
    kinds = {}
    start = time.perf_counter()
    deep_basis, count = first_independent_rows(search.unit, rows[:, :negative], search.dep_tol)
    kinds["deepest b-1 rows"] = (complement(deep_basis[count == b - 1], 1, g)[:, :, 0], time.perf_counter() - start)
    start = time.perf_counter()
    robust = robust_kernels(search.unit, rows[:, : 4 * b], max(1e-9, problem.tol), search.dep_tol, g)
    kinds["robust kernels (4b rows)"] = (robust, time.perf_counter() - start)
    for name, (q, seconds) in kinds.items():
        passing = noisy_zero_mask(problem, search.L, q).sum(0) >= search.min_zeros
        hits = ((q[passing] @ truth[:, missing]).abs() > 1 - 1e-6)
        print(f"{name}: {seconds + setup:.2f} s, {int(passing.sum())} pass the filter, {int(hits.any(1).sum())} are "
              f"columns of missing samples, covering {int(hits.any(0).sum())} of {int(missing.sum())}")


if __name__ == "__main__":
    main()
