"""`reconstruct`: SPEAR on one Linear+ReLU layer, with the solver chosen by `solver`."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
from torch import Tensor

from fedsim.training import single_thread

from fedsim.attacks.spear.dictionary import DictionarySearch
from fedsim.attacks.spear.factorisation import (_CERT_SAFETY, _DICTIONARY_AFTER, _DICTIONARY_FORCED_ROWS, _EXACT, _F32_FLOOR, _F64, _NOISE_FLOOR,
    _SAMPLING_EXACT_MAX_B, _SAMPLING_MAX_B, _SAMPLING_MAX_TOL, Consistency, Problem, SpearResult, leading_singular_values,
    prepare)
from fedsim.attacks.spear.sampling import Search
from fedsim.attacks.spear.selection import (Candidates, Selection, _solve_inputs, best_effort, certify, sample_errors,
    select)


# --- the algorithm ----------------------------------------------------------------------------------------------------

def reconstruct(
    weight: Tensor,
    bias: Tensor | None,
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    batch_size: int | None = None,
    *,
    max_samples: int = 20_000_000,
    max_seconds: float | None = None,
    tau: float = 0.1,
    tol: float | None = None,
    subset: int = 12,
    chunk: int = 4096,
    deflate: bool = True,
    solver: str = "auto",
    weight_after: Tensor | None = None,
    bias_after: Tensor | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    layer_known: bool = True,
) -> SpearResult:
    """SPEAR on one Linear layer followed by ReLU. Shapes as torch.nn.Linear:

    weight: (m, n), bias: (m,), grad_weight: (m, n), grad_bias: (m,), any float dtype (float64 inside).
    batch_size: b (distinct samples in the update), or None to estimate it as the numerical rank of grad_weight.
    max_samples: the search budget, counted (deterministic): sampled (b-2)-row families for the sampling solver,
    proposed points for the dictionary solver. max_seconds: a wall-clock safety net only (None: none); when it stops
    the search the result says so (`stop_reason` "seconds", `budget_exhausted`), since then the answer depends on
    the machine's speed.
    tau: a direction is a candidate when L q is zero on at least tau x m' rows (m' = active rows).
    tol: relative zero tolerance (None: from the gradient's own noise level, see `zero_tolerance`).
    subset: rows on which each family's proposals are screened before a full count; chunk: families per batch.
    deflate: condition later families on directions already found (see `Search.sample`); False samples exactly
    as the paper does.
    solver: "sampling" (SPEAR's search), "dictionary" (the large-batch search, `DictionarySearch`), or "auto": sampling
    on exact gradients up to b = 12 and on mildly noisy ones up to b = 24, dictionary otherwise.
    weight_after, bias_after: the layer after the client's local training (FedAvg with several steps): the ReLU
    pattern of each sample was set somewhere between the two, so the certificate judges only the entries whose
    sign agrees at both ends.
    seed: seeds the sketch and the search (the result is deterministic given the inputs and the seed).
    device: where the search runs (None: the weight's device). Random draws come from CPU generators and are moved
    there, so a CUDA run makes the same draws as a CPU one; the result's tensors are on that device.
    layer_known: False when weight and bias are the attacker's stand-in for the layer, not its own (the key-lock's
    layer without the key): the gradient's zeros still give the batch, but the certificate's sign check fails on
    the right answer too, so, as on a noisy gradient, the search stops once a counted stretch of samples (or three
    rounds) improved nothing (`stop_reason` "converged"), not at its budget.

    Stops as soon as a certified reconstruction exists; on a noisy gradient, once further search stops changing
    the selection; otherwise at the budget. Never raises on a finite gradient of a valid shape: without an exact
    answer it returns the most consistent one it found, `certified=False`, with per-sample error estimates. Raises
    `AttackNotApplicable` without a bias, on a non-finite gradient, or when b >= min(m, n).

    Runs on one intra-op thread: its batched small solves gain nothing from more (measured), and the result is then
    the same bit for bit on every machine, whatever its core count.
    """
    if solver not in ("auto", "sampling", "dictionary"):
        raise ValueError(f"solver must be one of auto, sampling, dictionary; got {solver!r}")
    device = torch.device(device) if device is not None else weight.device
    weight, bias, grad_weight, grad_bias, weight_after, bias_after = (
        None if t is None else t.detach().to(device) for t in (weight, bias, grad_weight, grad_bias, weight_after,
                                                                bias_after))
    with single_thread():
        return _reconstruct(weight, bias, grad_weight, grad_bias, batch_size, max_samples=max_samples,
                            max_seconds=max_seconds, tau=tau, tol=tol, subset=subset, chunk=chunk, deflate=deflate,
                            solver=solver, weight_after=weight_after, bias_after=bias_after, seed=seed,
                            layer_known=layer_known)


def _reconstruct(weight: Tensor, bias: Tensor | None, grad_weight: Tensor, grad_bias: Tensor | None,
                 batch_size: int | None, *, max_samples: int, max_seconds: float | None, tau: float,
                 tol: float | None, subset: int, chunk: int, deflate: bool, solver: str,
                 weight_after: Tensor | None, bias_after: Tensor | None, seed: int,
                 layer_known: bool) -> SpearResult:
    start = time.perf_counter()
    problem, fact, rank = prepare(weight, bias, grad_weight, grad_bias, batch_size, tol=tol, seed=seed,
                                  weight_after=weight_after, bias_after=bias_after)
    gen = torch.Generator().manual_seed(seed + 1)
    m, b = problem.L.shape
    active = problem.unit_rows.abs().sum(dim=1) > 0
    pool = torch.nonzero(active).flatten()
    # Noisy: noise above float32 rounding (gradients are float32 on the wire; a float64 copy of one is no cleaner).
    noisy = problem.tol > max(problem.floor, _F32_FLOOR) * (1 + 1e-9)
    m_act, n = pool.numel(), weight.shape[1]
    # Below the noise's own largest singular value (Marchenko-Pastur edge) the b-th direction of the batch is lost
    # in the noise: no answer is exact (`noise_limited`), but the columns of the samples it hardly involves are still
    # found, and most of the batch is (measured at sigma 1e-4, b = 32: benchmarks/spear_noise_ceiling.py), so the
    # search runs. When a quarter of the batch's directions or more are lost, none is run beyond a short look.
    edge = problem.noise_std * (math.sqrt(max(m - b, 1)) + math.sqrt(max(n - b, 1)))
    below = int((leading_singular_values(grad_weight, b, seed) <= _NOISE_FLOOR * edge).sum()) if noisy else 0
    lost, hopeless = below > 0, 4 * below >= b
    # Mild noise (a FedAvg delta's float32 cancellation, SecAgg+'s quantisation): the sampling search still finds
    # the columns at the tolerance it was tuned with (capped at 1e-3); heavier noise needs the dictionary solver.
    mild = noisy and problem.tol <= _SAMPLING_MAX_TOL
    # auto: the cheaper search, measured (BENCHMARKS.md): sampling on small exact batches and on mildly noisy ones up
    # to b = 24 (its tuned tolerance), the large-batch search otherwise.
    limit = _SAMPLING_MAX_B if noisy else _SAMPLING_EXACT_MAX_B
    # A batch with a direction lost in the noise is searched by the large-batch search, whatever the solver.
    use_dictionary = solver == "dictionary" or lost or (solver == "auto" and ((noisy and not mild) or b > limit))
    # The certificate in the gradient's own band (the large-batch search's): on an exact gradient, a selection that
    # breaks the sampling search's wider band is judged there too. A well-fitted sample's gradient column can be
    # 1e-5 of the others', so its active entries fall inside the wider band's zero and read as violations of an
    # exact answer (the demo's clipping-only job at round 50: 1 violation, errors 1e-7, never certified).
    own_band = problem if not noisy else None
    if not use_dictionary:
        problem = replace(problem, tol=max(problem.sampling_tol, problem.tol) if mild else problem.sampling_tol)
    tol_zero = problem.tol
    min_zeros = max(b - 1, math.ceil(tau * m_act))
    # The large-batch search's candidates are kernels of all their zero rows, with no forced row: a column whose
    # zero set lies within a few rows of another's is a near-duplicate sample, not a mix (a mix of two columns is
    # zero only on their intersection), so it is not set aside as dominated.
    cands = Candidates.empty(m, b, forced_rows=_DICTIONARY_FORCED_ROWS if use_dictionary else -1,
                             device=problem.L.device)
    if use_dictionary:
        search = DictionarySearch.create(problem, pool, m, min_zeros, cands, noisy=noisy,
                                         moved=weight_after is not None,
                                         scored=noisy and not mild and weight_after is None)
    else:
        search = Search(
            act_rows=problem.unit_rows[pool], pool=pool, m=m, min_zeros=min_zeros,
            min_run=max(4, math.ceil(0.01 * m_act)), tol=tol_zero, pair_tol=min(1e-2, 10.0 * tol_zero),
            count_tol=min(1e-2, 10.0 * tol_zero), cands=cands)

    best: Selection | None = None
    best_pinned = False
    stop_reason = "samples"

    improved_at, first_full = 0, None

    def attempt(swaps: int) -> bool:
        """Choose b columns from the pool; True when the best choice so far is consistent and pinned (the search
        can stop). A consistent choice that is not pinned by its zero rows (wrong, or near-duplicates) is kept as
        the best so far, but a pinned consistent choice replaces it, and the search goes on."""
        nonlocal best, best_pinned, improved_at, first_full
        found = select(problem, search.cands, b, swaps)
        if found is not None:
            pinned = None
            if found.consistency.mismatches != 0 and own_band is not None and own_band is not problem:
                # Consistent in the gradient's own band counts only for an answer pinned down by its zero rows: the
                # narrower band checks fewer zeros. (A well-fitted sample's tiny column reads as violations in the
                # sampling band: the demo's clipping-only job at round 50.)
                violations, bias_res = certify(own_band, found.Q[None])
                if int(violations[0]) == 0 and _pinned(problem, found.Q, fact.R):
                    found, pinned = replace(found, consistency=Consistency(0, float(bias_res[0]))), True
            if found.consistency.mismatches == 0 and pinned is None:
                pinned = _pinned(problem, found.Q, fact.R)
            if (best is None or found.consistency.mismatches < best.consistency.mismatches
                    or (found.consistency.mismatches == 0 and pinned and not best_pinned)):
                best, best_pinned, improved_at = found, bool(pinned), search.samples
                first_full = search.samples if first_full is None else first_full
            elif noisy and not best_pinned and found.consistency.mismatches == best.consistency.mismatches:
                # Under noise the band holds many choices equally: the later one, from a larger pool, replaces it
                # (the first consistent choice kept for good scored 12.4 dB at sigma 1e-4, b = 24; the choice on the
                # pool 6 rounds on, 34.3 dB). Not an improvement: the sampling search's stop rule does not restart.
                best, best_pinned = found, bool(pinned)
        return best is not None and best.consistency.mismatches == 0 and best_pinned

    # No certificate may ever come: the gradient is noisy, or the layer is a stand-in whose signs are not the batch's.
    uncertifiable = noisy or not layer_known

    def settled() -> bool:
        """The search may stop without a certificate: none may ever come (`uncertifiable`), or the best choice is
        consistent but not pinned (near-duplicate samples told apart by a row or two)."""
        return uncertifiable or (best is not None and best.consistency.mismatches == 0)

    def out_of_time() -> bool:
        return max_seconds is not None and time.perf_counter() - start > max_seconds

    if b == 1:
        search.cands.add(torch.ones(1, 1, dtype=_F64, device=active.device), (~active).sum().view(1),
                         (~active)[:, None].clone())
        stop_reason = "solved"
    elif hopeless:
        search.round(min(max_samples, 4 * b), gen)
        stop_reason = "noise"
    elif isinstance(search, DictionarySearch):
        # Rounds of proposals until the selection is certified, or (noisy gradient) until rounds stop changing it.
        # The greedy choice, then swaps at the positions with violations, whenever the pool changed.
        starts, stable, tried, swapped = max(64, 4 * b), 0, -1, -1
        while search.samples < max_samples:
            if out_of_time():
                stop_reason = "seconds"
                break
            before = None if best is None else best.indices
            search.round(min(starts, max_samples - search.samples), gen)
            if len(search.cands) >= b and search.cands.version != tried:
                tried = search.cands.version
                if attempt(swaps=0):
                    stop_reason = "certified"
                    break
                # Beyond _CHECK_PATTERNS_ABOVE samples: set aside chosen mixes that no single input explains, then
                # choose again (a few linear programs instead of swaps over the whole pool).
                certified = False
                while not certified and best is not None and search.screen(
                        best.Q, certify(problem, best.Q[None], per_column=True)[0][0]):
                    best, tried = None, search.cands.version
                    certified = attempt(swaps=0)
                if certified:
                    stop_reason = "certified"
                    break
            if len(search.cands) >= b and search.cands.version != swapped:
                swapped = search.cands.version   # swaps cost seconds at b = 64: once per change of the pool
                if attempt(swaps=4):
                    stop_reason = "certified"
                    break
            stable = stable + 1 if (best is not None and best.indices == before) else 0
            if settled() and best is not None and stable >= 3:
                stop_reason = "converged" if uncertifiable else "unpinned"
                break
    elif b == 2:
        search.screen_plane()
        stop_reason = "solved"
    elif pool.numel() - (b - 2) >= 2:
        size, tried, next_swaps, batches = 64, -1, 0, 0
        # A batch the sampling search has not solved by then gets large-batch rounds into the same candidate pool too
        # (a different route to the same columns), on a doubling schedule counted in samples.
        helper = DictionarySearch.create(problem, pool, m, min_zeros, search.cands, noisy=noisy,
                                         moved=weight_after is not None)
        next_dictionary, helper_gen = _DICTIONARY_AFTER, torch.Generator().manual_seed(seed + 2)
        while search.samples < max_samples:
            if out_of_time():
                stop_reason = "seconds"
                break
            # Deflated families on three batches in four, uniform ones on the fourth (the paper's distribution),
            # so that a column whose zeros overlap the found ones' poorly is still reached.
            batches += 1
            search.sample(min(size, max_samples - search.samples), subset, gen,
                          deflate=deflate and batches % 4 != 0 and len(search.cands) > 0)
            size = min(2 * size, chunk)
            if len(search.cands) < b:
                continue
            if search.cands.version != tried:
                tried = search.cands.version
                if attempt(swaps=0):
                    stop_reason = "certified"
                    break
            if search.samples >= next_swaps:
                next_swaps = 2 * search.samples
                if attempt(swaps=4):
                    stop_reason = "certified"
                    break
            if search.samples >= next_dictionary:
                next_dictionary *= 2
                helper.round(max(64, 4 * b), helper_gen)
                if len(search.cands) >= b and attempt(swaps=4):
                    stop_reason = "certified"
                    break
            # Noisy, or consistent but unpinned: no certificate may ever come; stop once a long stretch of samples
            # improved nothing.
            if settled() and first_full is not None and search.samples - improved_at >= max(3 * first_full, 100_000):
                stop_reason = "converged" if uncertifiable else "unpinned"
                break
    if len(search.cands) >= b and not (best is not None and best.consistency.mismatches == 0 and best_pinned):
        attempt(swaps=4)

    if best is not None:
        Q, cons, stage = best.Q, best.consistency, best.stage
    else:  # step 5 on what there is
        Q, stage = best_effort(problem, search.cands, b, gen), 0
        mism, bias_res = certify(problem, Q[None])
        cons = Consistency(int(mism[0]), float(bias_res[0]))
    inputs = _solve_inputs(Q, fact.R)
    errors = sample_errors(problem, Q, inputs)
    fit_ok = problem.fit_residual <= 10 * tol_zero
    certified = (stage > 0 and cons.mismatches == 0 and fit_ok and cons.bias_residual <= 10 * tol_zero
                 and bool((_CERT_SAFETY * errors <= _EXACT).all()))
    if certified:
        stop_reason = "certified"
    elif stop_reason == "certified":
        # The search's checks held (pattern, bias relation, pins), but the certificate's tolerance on the fit or the
        # bias residual did not: no answer can be certified, more search would not change that.
        stop_reason = "unpinned"
    exhausted = not certified and stop_reason in ("samples", "seconds")
    return SpearResult(
        inputs=inputs, grad_out=problem.L @ Q, certified=bool(certified), samples=search.samples,
        proposals=search.proposals, candidates=len(search.cands), seconds=time.perf_counter() - start,
        batch_size=b, batch_size_estimated=None if batch_size is not None else rank, rank=rank, tol=tol_zero,
        mismatches=cons.mismatches, fit_residual=problem.fit_residual, bias_residual=cons.bias_residual,
        stage=stage, noise_std=problem.noise_std, sample_errors=errors, budget_exhausted=exhausted,
        stop_reason=stop_reason, solver="dictionary" if isinstance(search, DictionarySearch) else "sampling",
        noise_limited=lost)


def _pinned(problem: Problem, Q: Tensor, R: Tensor) -> bool:
    """Every sample of the selection `Q` is pinned down by its zero rows: its estimated relative error, with the
    certificate's safety factor, within the exact threshold (the per-sample half of the certificate)."""
    return bool((_CERT_SAFETY * sample_errors(problem, Q, _solve_inputs(Q, R)) <= _EXACT).all())
