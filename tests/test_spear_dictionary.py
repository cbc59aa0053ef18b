"""SPEAR's large-batch search (attacks/spear/dictionary.py): batches far beyond the sampling search, exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedsim.attacks.spear import prepare, reconstruct
from fedsim.attacks.spear.dictionary import (DictionarySearch, complement, deep_rows, first_independent_rows,
                                             robust_kernels, sign_violations)
from fedsim.attacks.spear.factorisation import leading_singular_values, noisy_zero_mask
from fedsim.attacks.spear.selection import Candidates
from fedsim.metrics import score
from tests.test_spear import demo_case, fc_case, matched_errors, true_directions_inputs, true_output_gradients


@pytest.mark.parametrize("seed", [0, 1])
def test_large_batch_search_recovers_32_natural_images_exactly_and_certifies(seed):
    """b = 32 crops of photographs (correlated, with near-duplicates) at width 1000: every sample to 1e-3.
    Seed 1 stopped at its budget with 528 sign violations in an earlier version of the search; today seeds 0-4 all
    certify (0.5-7 s on one core). BENCHMARKS.md gives the rates over the benchmark's trials."""
    _, model, x, _, grads = fc_case("patches", 1000, 32, seed)
    layer = model.net[1]
    result = reconstruct(layer.weight, layer.bias, grads["net.1.weight"], grads["net.1.bias"], 32,
                         solver="dictionary", seed=seed)
    assert result.solver == "dictionary" and result.certified and result.stop_reason == "certified"
    assert matched_errors(result.inputs, x).max() <= 1e-3


def _row_by_row(unit_rows, rows, dep_tol, b):
    """The reference: Gram-Schmidt one row at a time, keeping a row whose residual exceeds dep_tol."""
    bases, counts = [], []
    for order in rows:
        kept = []
        for j in order.tolist():
            if len(kept) == b - 1:
                break
            r = unit_rows[j].clone()
            for u in kept:
                r = r - (u @ r) * u
            if r.norm() > dep_tol:
                kept.append(r / r.norm())
        counts.append(len(kept))
        bases.append(torch.stack(kept, dim=1) if kept else torch.zeros(unit_rows.shape[1], 0, dtype=torch.float64))
    return bases, counts


@pytest.mark.parametrize("b", [6, 33])
def test_the_blocked_row_scan_keeps_the_rows_a_row_by_row_scan_keeps(b):
    """`first_independent_rows` scans rows in blocks; on rows built to be dependent (exact duplicates, rows inside
    a 3-dimensional subspace, rows that differ from a kept one by 1e-6, below the tolerance) it keeps, for every
    proposal, the same number of rows spanning the same subspace as plain Gram-Schmidt, and a short proposal stays
    short."""
    g = torch.Generator().manual_seed(b)
    random = torch.randn(3 * b, b, generator=g, dtype=torch.float64)
    flat = torch.randn(2 * b, 3, generator=g, dtype=torch.float64) @ torch.randn(3, b, generator=g,
                                                                                dtype=torch.float64)
    near = random[: b] + 1e-6 * torch.randn(b, b, generator=g, dtype=torch.float64)
    unit = torch.cat((random, random[: b], flat, near))
    unit = unit / unit.norm(dim=1, keepdim=True)
    m = unit.shape[0]
    orders = [torch.randperm(m, generator=g) for _ in range(12)]
    orders.append(torch.arange(3 * b, m))                          # duplicates, the flat rows, near-copies first
    orders.append(torch.cat((torch.arange(4 * b, 6 * b), torch.arange(b))))  # 3 + b rows: complete only at b - 1
    orders.append(torch.arange(4 * b, 6 * b))                      # only the flat rows: 3 of b - 1
    k = min(len(o) for o in orders)
    rows = torch.stack([o[:k] for o in orders])
    basis, count = first_independent_rows(unit, rows, 1e-4)
    reference, ref_count = _row_by_row(unit, rows, 1e-4, b)
    assert count.tolist() == ref_count and ref_count[-1] == 3 and ref_count[0] == b - 1
    for i, ref in enumerate(reference):
        got = basis[i, :, : count[i]]
        assert torch.allclose(got.T @ got, torch.eye(count[i], dtype=torch.float64), atol=1e-10)
        assert torch.allclose(got @ got.T, ref @ ref.T, atol=1e-8)          # the same subspace
        if count[i] < b - 1:
            assert basis[i, :, count[i]:].abs().max() == 0                # unused slots stay empty
    # Fewer rows than b - 1 (a point with few rows behind it): counted as what they span, never as complete.
    short_basis, short_count = first_independent_rows(unit, rows[:, : b - 3], 1e-4)
    assert short_basis.shape == basis.shape and short_count.tolist() == _row_by_row(unit, rows[:, : b - 3], 1e-4, b)[1]


def _plane_rows(b: int, inliers: int, rival: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """4b unit rows: `inliers` on the hyperplane q^perp (the last 10 exact copies of the first 10), `rival` on a
    second hyperplane, the rest random. Returns (rows, q)."""
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    q, q2 = rand(b), rand(b)
    q, q2 = q / q.norm(), q2 / q2.norm()
    on = rand(inliers, b)
    on = on - (on @ q)[:, None] * q
    on[-10:] = on[:10]
    near = rand(rival, b)
    near = near - (near @ q2)[:, None] * q2
    unit = torch.cat((on, near, rand(4 * b - inliers - rival, b)))
    return unit / unit.norm(dim=1, keepdim=True), q


def test_robust_kernels_find_the_plane_most_rows_lie_on_and_the_first_rows_miss_it():
    """`robust_kernels` on proposals of 4b = 132 rows, 110 of them on one hyperplane q^perp (10 exact duplicates
    among them), 12 on a competing hyperplane, 10 random, in 6 orders: it returns q to rounding, and to the noise's
    order when the plane's rows carry noise of 1e-7; the kernel of the first b-1 independent rows (what a deep-row
    proposal uses) is not q, since off-plane rows are among them. Its limit, shown too: with 50 of the rows on the
    plane and the others random, it does not find q (measured on 20 draws each, the others random: 20 of 20 at 110
    rows on the plane, 18 at 100 with 20 on a rival plane, 0 at 80 and below)."""
    b = 33
    g = torch.Generator().manual_seed(3)
    unit, q = _plane_rows(b, 110, 12, g)
    rows = torch.stack([torch.randperm(4 * b, generator=g) for _ in range(6)])
    assert ((robust_kernels(unit, rows, 1e-9, 1e-4, g) @ q).abs() > 1 - 1e-12).all()
    noisy = unit.clone()
    noisy[:110] += 1e-7 * torch.randn(110, b, generator=g, dtype=torch.float64)
    noisy = noisy / noisy.norm(dim=1, keepdim=True)
    assert ((robust_kernels(noisy, rows, 1e-7, 1e-4, g) @ q).abs() > 1 - 1e-9).all()
    basis, count = first_independent_rows(unit, rows, 1e-4)
    assert (count == b - 1).all()
    assert ((complement(basis, 1, g)[:, :, 0] @ q).abs() < 0.99).all()
    few, q_few = _plane_rows(b, 50, 0, g)
    assert float((robust_kernels(few, rows[:1], 1e-9, 1e-4, g) @ q_few).abs()) < 0.99


def test_robust_kernels_reach_the_samples_the_deep_rows_miss():
    """The claim behind them, on b = 32 natural-image crops at width 1000: with the columns of the 16 samples
    closest to another input found (points drawn orthogonal to them, as the search does), 128 points propose
    columns of the 16 lonely others. The deep rows' kernels reach few of them, the robust kernels most (measured
    here: 6 and 14 of 16)."""
    b = 32
    _, model, x, y, grads = fc_case("patches", 1000, b, 0)
    layer = model.net[1]
    z = layer(x.flatten(1))
    z.retain_grad()
    F.cross_entropy(model.net[3](F.relu(z)), y).backward()
    G = z.grad.T.double()                                                # (m, b): the columns to find
    problem, _, _ = prepare(layer.weight, layer.bias, grads["net.1.weight"], grads["net.1.bias"], b)
    truth = problem.L.T @ G
    truth = truth / truth.norm(dim=0, keepdim=True)
    pool = torch.nonzero(problem.row_norm > 0).flatten()
    m = problem.L.shape[0]
    search = DictionarySearch.create(problem, pool, m, 100, Candidates.empty(m, b))
    flat = x.flatten(1).double()
    cos = (flat @ flat.T) / (flat.norm(dim=1)[:, None] * flat.norm(dim=1)[None, :])
    found = torch.argsort(cos.fill_diagonal_(-1).max(1).values, descending=True)[: b // 2]
    lonely = torch.ones(b, dtype=torch.bool)
    lonely[found] = False
    g = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(truth[:, found])
    points = torch.randn(128, b, generator=g, dtype=torch.float64)
    points = points - (points @ basis) @ basis.T
    points = points / (points @ problem.R).norm(dim=1, keepdim=True) * search.scale
    rows, negative = deep_rows(search.A, search.offset, points)
    deep_basis, count = first_independent_rows(search.unit, rows[:, :negative], search.dep_tol)
    deep = complement(deep_basis[count == b - 1], 1, g)[:, :, 0]
    robust = robust_kernels(search.unit, rows[:, : 4 * b], max(1e-9, problem.tol), search.dep_tol, g)
    reached = [int(((q @ truth[:, lonely]).abs() > 1 - 1e-6).any(0).sum()) for q in (deep, robust)]
    assert reached[1] >= 10 and reached[1] >= 2 * reached[0], reached


def test_auto_takes_the_cheaper_search_for_the_batch_size():
    """Exact gradients: SPEAR's sampling for small batches, the large-batch search above 12 (BENCHMARKS.md)."""
    for b, expected in ((8, "sampling"), (16, "dictionary")):
        _, model, x, _, grads = fc_case("patches", 1000, b, 0)
        layer = model.net[1]
        result = reconstruct(layer.weight, layer.bias, grads["net.1.weight"], grads["net.1.bias"], b)
        assert result.solver == expected and result.certified
        assert matched_errors(result.inputs, x).max() <= 1e-3


def test_a_zero_pattern_no_single_input_has_is_told_from_a_column():
    """The linear program behind the mixes' rejection: a true column's zero set is one input's inactive rows (no
    violation); a set zero where two samples are both inactive and where both are active (what a mix of dependent
    output gradients vanishes on) is explained by no input. With a limit the answer may be a lower bound, never
    one that turns a true column into a mix or a mix into a column."""
    b = 16
    _, model, x, y, grads = fc_case("patches", 1000, b, 0)
    layer = model.net[1]
    problem, _, _ = prepare(layer.weight, layer.bias, grads["net.1.weight"], grads["net.1.bias"], b)
    pool = torch.nonzero(problem.row_norm > 0).flatten()
    search = DictionarySearch.create(problem, pool, problem.L.shape[0], 10, Candidates.empty(problem.L.shape[0], b))
    z = (layer.weight @ x.flatten(1).T + layer.bias[:, None]).detach().double()[pool]     # (m', b) pre-activations
    inactive = z <= 0
    for i in range(3):
        assert sign_violations(search.A, search.offset, inactive[:, i]) == 0
        assert sign_violations(search.A, search.offset, inactive[:, i], limit=20) == 0
    both_off, both_on = inactive[:, 0] & inactive[:, 1], ~inactive[:, 0] & ~inactive[:, 1]
    fewest = sign_violations(search.A, search.offset, both_off | both_on)
    assert fewest > 0.1 * pool.numel()
    # With a limit, the count on every fifth row settles it: a lower bound, above the limit, below the full count.
    assert 20 < sign_violations(search.A, search.offset, both_off | both_on, limit=20) <= fewest


def test_noisy_batch_of_32_is_reconstructed_above_35_db():
    """DP-style noise sigma 1e-5 (clip 1) on a batch of 32: no exact answer, a faithful one (measured 51.9 dB).
    At sigma 1e-4 the 32nd direction is at the noise's edge (the last test of this file)."""
    data, model, x, grads = demo_case(1e-5, 32)
    layer = model.net[1]
    result = reconstruct(layer.weight, layer.bias, grads["net.1.weight"], grads["net.1.bias"], 32)
    to_pixels = data.normalization.to_pixels
    scores = score(to_pixels(result.inputs.float().reshape(x.shape)), to_pixels(x))
    assert result.solver == "dictionary" and not result.certified and result.stop_reason == "converged"
    assert scores.psnr >= 35 and scores.ssim >= 0.95


def test_pattern_scores_rank_columns_above_the_mixes_a_zero_count_prefers():
    """Noise sigma 1e-4 (clip 1), b = 16 (demo_case seed 6): the true columns against mixes q_a +- q_b of the ten
    most similar pairs. By zero count (the exact search's order) five mixes outrank the median column; by the share
    of clear rows no input explains, every mix of a pair less similar than cos 0.8 ranks below every column (true
    0.02-0.11, such mixes 0.14 and up; the closest pair's sum, cos 0.84, scores 0.075)."""
    b = 16
    _, model, _, noisy = demo_case(1e-4, b, 6)
    layer = model.net[1]
    problem, _, _ = prepare(layer.weight, layer.bias, noisy["net.1.weight"], noisy["net.1.bias"], b)
    Q = problem.L.T @ true_output_gradients(b, 6)
    Q = Q / Q.norm(dim=0)
    pool = torch.nonzero(problem.row_norm > 0).flatten()
    search = DictionarySearch.create(problem, pool, problem.L.shape[0], b - 1, Candidates.empty(problem.L.shape[0], b),
                                     noisy=True, scored=True)
    similar = (Q.T @ Q).abs().triu(1)
    pairs = sorted(torch.nonzero(similar).tolist(), key=lambda p: -float(similar[p[0], p[1]]))[:10]
    mixes = torch.stack([Q[:, i] + sign * Q[:, j] for sign in (1, -1) for i, j in pairs])
    mixes = mixes / mixes.norm(dim=1, keepdim=True)
    cos = torch.tensor([float(similar[i, j]) for i, j in pairs] * 2)
    columns, mixed = search.pattern_scores(Q.T), search.pattern_scores(mixes)
    assert bool((mixed[cos < 0.8] > columns.max()).all()) and float(columns.max()) < 0.15
    counts = noisy_zero_mask(problem, search.L, Q.T).sum(0)
    assert int((noisy_zero_mask(problem, search.L, mixes).sum(0) > counts.median()).sum()) >= 5


def test_noise_sigma_1e4_leaves_a_batch_of_24_near_its_least_squares_ceiling():
    """sigma 1e-4 (clip 1), b = 24 (demo_case seed 0): least squares with every sample's TRUE output gradient gives
    38.5 dB (benchmarks/spear_noise_ceiling.py); SPEAR, which must find them, 35.9 dB. Before candidates were ranked
    by `pattern_scores`, the first selection consistent within the noise band was kept: 12.4 dB."""
    b = 24
    data, model, x, noisy = demo_case(1e-4, b, 0)
    layer = model.net[1]
    ceiling = torch.linalg.lstsq(true_output_gradients(b, 0), noisy["net.1.weight"].double()).solution
    result = reconstruct(layer.weight, layer.bias, noisy["net.1.weight"], noisy["net.1.bias"], b)
    to_pixels = data.normalization.to_pixels
    psnr = score(to_pixels(result.inputs.float().reshape(x.shape)), to_pixels(x)).psnr
    best = score(to_pixels(ceiling.float().reshape(x.shape)), to_pixels(x)).psnr
    assert result.stop_reason == "converged" and not result.noise_limited and not result.budget_exhausted
    assert psnr >= 34 and psnr >= best - 3.5


def test_a_batch_whose_weakest_direction_is_in_the_noise_is_still_searched():
    """sigma 1e-4 (clip 1), b = 32 (demo_case seed 4): the 32nd direction is at the noise's edge (noise_limited: no
    answer can be exact), the others stand clear of it. SPEAR searches anyway and recovers much of the batch (23.8 dB
    measured; the least-squares ceiling is 37.2 dB). Before, it stopped at once with `noise` and 11.0 dB."""
    data, model, x, noisy = demo_case(1e-4, 32, 4)
    layer = model.net[1]
    result = reconstruct(layer.weight, layer.bias, noisy["net.1.weight"], noisy["net.1.bias"], 32)
    to_pixels = data.normalization.to_pixels
    scores = score(to_pixels(result.inputs.float().reshape(x.shape)), to_pixels(x))
    assert result.noise_limited and result.stop_reason == "converged" and not result.budget_exhausted
    assert scores.psnr >= 20 and not result.certified


def test_at_sigma_1e4_a_batch_of_32_is_out_of_reach_of_any_search_inside_the_gradients_span():
    """sigma 1e-4 (clip 1), b = 32 (demo_case seed 2): least squares with the true output gradients gives 33.4 dB,
    but SPEAR (and SPEAR++) look for the columns inside the update's leading b-dimensional column space, which the
    noise bends away from the weakest samples' columns (the smallest keeps 78% of its norm inside). Even the true
    directions in that space, through SPEAR's last step (scales from the bias gradient, then the inverse), give
    10.2 dB: BENCHMARKS.md's "subspace" column, and why the issue's 35 dB at b = 32 is not met by a search."""
    b, seed = 32, 2
    data, model, x, noisy = demo_case(1e-4, b, seed)
    layer = model.net[1]
    G = true_output_gradients(b, seed)
    problem, _, _ = prepare(layer.weight, layer.bias, noisy["net.1.weight"], noisy["net.1.bias"], b)
    inputs, share = true_directions_inputs(problem, G)     # asserts that every scale came out
    to_pixels = data.normalization.to_pixels
    ceiling = torch.linalg.lstsq(G, noisy["net.1.weight"].double()).solution
    best = score(to_pixels(ceiling.float().reshape(x.shape)), to_pixels(x)).psnr
    within = score(to_pixels(inputs.float().reshape(x.shape)), to_pixels(x)).psnr
    assert best >= 33 and within <= 15
    assert float(share.min()) < 0.8


@pytest.mark.parametrize("b,seed", [(16, 2), (32, 0), (32, 4)])
def test_the_noise_check_reads_the_weakest_direction_as_a_full_svd_does(b, seed):
    """The range finder's estimate of the b-th singular value under noise sits below the noise's edge where a full
    SVD puts it above (b = 16, seed 2: 0.94 against 1.27 of the edge; b = 32, seed 0: 0.89 against 1.06), which made
    SPEAR give up on batches it recovers. The noise check's own estimate is within 1% of the full SVD."""
    _, _, _, noisy = demo_case(1e-4, b, seed)
    dW = noisy["net.1.weight"].double()
    full = torch.linalg.svdvals(dW)[:b]
    assert torch.allclose(leading_singular_values(dW, b, seed=0), full, rtol=1e-2)


@pytest.mark.slow
def test_large_batch_search_recovers_64_natural_images_exactly_and_certifies():
    """The issue's bar, on the benchmark's first trial: b = 64 at width 1000, input 3072 (24.5 s on 2 cores there;
    9 of 10 trials exact, BENCHMARKS.md). Not every batch: this file's own fc_case(seed=3) batch of 64 did not
    certify within 550 s."""
    spec = importlib.util.spec_from_file_location("spear_bench", Path(__file__).parents[1] / "benchmarks" /
                                                  "spear_bench.py")
    bench = importlib.util.module_from_spec(spec)     # the benchmark's data and model, one trial
    spec.loader.exec_module(bench)
    row = bench.trial(3072, 1000, 64, 0, {"max_samples": 20_000_000, "max_seconds": 600.0}, True, "dictionary")
    assert row["exact"] and row["certified"]
