"""SPEAR step 1 and the noise model shared by every solver: dW = L R, the noise estimate, zero tolerances,
the `Problem` that selection and certification read, and the result types."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedsim.errors import AttackNotApplicable

_F64 = torch.float64
_F64 = torch.float64
_ZERO_SIGMAS = 4.5         # a zero of L q lies within this many noise standard deviations of 0 (Gaussian noise)
_NOISE_FLOOR = 1.02        # S_b below this many times the noise's largest singular value: the b-th direction is lost
_EXACT = 1e-3              # relative error up to which a sample counts as exact (as fedsim.metrics' `exact`)
_F32_FLOOR = 100 * torch.finfo(torch.float32).eps   # the exact regime's zero tolerance on float32 gradients
_SAMPLING_MAX_TOL = 1e-3   # auto: the sampling search's tolerance cap; noisier updates go to the dictionary solver
_DICTIONARY_AFTER = 100_000  # sampled families after which the sampling search also runs large-batch rounds
_DICTIONARY_FORCED_ROWS = 3  # large-batch candidates: zero rows outside a containing set that still mark a mix
_SAMPLING_MAX_B = 24       # auto, mildly noisy updates: the sampling search up to this b (its tuned tolerance)
_SAMPLING_EXACT_MAX_B = 12  # auto, exact gradients: above this b the large-batch search is cheaper (BENCHMARKS.md)
_CERT_SAFETY = 10.0        # a certified sample's estimated error bound times this must stay within _EXACT
_OVERSAMPLE = 10           # extra columns of the randomised range finder
_MIN_PLANE_NORM = 1e-3     # rows closer than this to orthogonal to a family's plane give no angle
_SAME = 1e-6               # directions with |cos| > 1 - _SAME are the same direction (about 1.4e-3 rad)
_SCREEN_ELEMENTS = 1 << 16  # subset rows x families screened per batch: small batches screen every row
_CONFIRM_ROWS = 64         # further rows on which a flagged family must show a third row at the shared angle


# --- results -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpearResult:
    """What `reconstruct` found.

    inputs: (b, n) float64, the batch in the layer's input space (order of the batch is not recoverable).
    grad_out: (m, b) float64, dL/dZ for each sample (the disaggregated output gradient G = L Q).
    certified: the reconstruction passed the self-consistency certificate (see `Consistency`).
    samples: random (b-2)-row submatrices (families) whose kernel was computed; each screens `subset` proposals.
    proposals: (b-1)-row proposals screened (families x subset rows).
    candidates: distinct directions that passed the sparsity filter.
    seconds: wall-clock time of the whole call.
    batch_size: the b used; batch_size_estimated: the numerical rank of grad_weight (None if not estimated);
    rank: numerical rank of grad_weight seen by the factorisation (at most b + oversampling when b is given).
    tol: zero tolerance used (relative; see `zero_tolerance`).
    mismatches: ReLU sign violations of the returned answer (0 when certified).
    fit_residual: ||dW - L R|| / ||dW||; bias_residual: ||G 1 - dbias|| / ||dbias||.
    stage: selection stage that produced the answer (1 greedy, 2 swaps, 0 best effort without b candidates).
    noise_std: estimated noise level of grad_weight (standard deviation per entry, see `Factorisation`).
    sample_errors: (b,) estimated relative error of each returned sample (see `sample_errors`): a per-sample
    confidence; a certified answer has every one at most 1e-3 / 10.
    budget_exhausted: the search stopped at its sample budget or its wall-clock cap without a certified answer
    (the answer might have improved with more budget; a report must not read it as the defense holding).
    stop_reason: certified, converged (no certificate can come: a noisy gradient, or a stand-in layer, see
    `reconstruct`'s layer_known; further search changed nothing), unpinned (a consistent answer, some sample not
    pinned down by its zero rows, its error estimate too large to certify, and a long stretch of further search
    found no pinned one; or a fit or bias residual above the certificate's tolerance),
    noise (a quarter or more of the batch's directions are below the noise's largest singular value: no search is
    run), solved (b <= 2), samples or seconds (budgets).
    solver: the search that ran (sampling or dictionary); noise_limited: at least the batch's weakest direction is
    below the noise's largest singular value (no answer can be exact; with fewer than a quarter below, the search
    still runs and its stop_reason is its own).
    """

    inputs: Tensor
    grad_out: Tensor
    certified: bool
    samples: int
    proposals: int
    candidates: int
    seconds: float
    batch_size: int
    batch_size_estimated: int | None
    rank: int
    tol: float
    mismatches: int
    fit_residual: float
    bias_residual: float
    stage: int
    noise_std: float = 0.0
    sample_errors: Tensor | None = None
    budget_exhausted: bool = False
    stop_reason: str = ""
    solver: str = "sampling"
    noise_limited: bool = False


@dataclass(frozen=True)
class Factorisation:
    """dW ~ L R with L: (m, b) orthonormal columns and R: (b, n) (= Sigma_b V_b^T of the SVD).

    singular_values: the leading singular values of dW found by the range finder (descending).
    noise: s_{b+1} / s_b, the part of dW outside rank b seen from its weakest direction (0 if not measured).
    noise_std: estimated standard deviation of the entries of dW outside its rank-b part,
    ||dW - L R||_F / sqrt((m - b)(n - b)) (the residual of a rank-b fit to signal plus i.i.d. noise has that many
    degrees of freedom): DP noise, quantisation, float32 rounding of a FedAvg delta, all seen the same way.
    residual_rows: (m,) ||dW_j - l_j R|| per row (None if not measured).
    """

    L: Tensor
    R: Tensor
    singular_values: Tensor
    noise: float
    noise_std: float = 0.0
    residual_rows: Tensor | None = None


@dataclass(frozen=True)
class Consistency:
    """The certificate of a candidate disaggregation Q (paper, Sec. 4: a wrong Q is never consistent).

    mismatches: entries where the ReLU pattern contradicts G: G zero but Z = W x + bias clearly positive, or G
    non-zero but Z clearly negative ("clearly": beyond tol times the scale of the entry, a band that absorbs the
    rounding of the observed gradient).
    bias_residual: ||G 1 - dbias|| / ||dbias||, with G = L Q.
    """

    mismatches: int
    bias_residual: float


# --- step 1: low-rank factorisation ---------------------------------------------------------------------------------

def estimate_rank(singular_values: Tensor) -> int:
    """Numerical rank: the position of the largest drop between consecutive singular values.

    A batch of b generic inputs gives b singular values well above the rounding floor and then a drop of several
    orders of magnitude (1e5..1e7 for float32 gradients), so the largest ratio s_k / s_{k+1} marks b.
    """
    s = singular_values.to(_F64)
    if s.numel() == 0 or s[0] <= 0:
        return 0
    floor = s[0] * torch.finfo(_F64).eps
    s = s.clamp_min(floor)
    if s.numel() == 1:
        return 1
    ratios = s[:-1] / s[1:]
    return int(torch.argmax(ratios)) + 1


def factorise(grad_weight: Tensor, batch_size: int | None, gen: torch.Generator) -> tuple[Factorisation, int]:
    """Step 1: the rank-b factorisation dW = L R by a randomised range finder (Halko et al.), O(m n k).

    When `batch_size` is None the sketch grows (32, 64, ...) until the numerical rank sits clearly inside it.
    Returns the factorisation and the numerical rank seen. grad_weight: (m, n) float64.
    """
    m, n = grad_weight.shape
    full = min(m, n)
    k = min(full, (batch_size + _OVERSAMPLE) if batch_size is not None else 32)
    while True:
        if k >= full:
            U, S, Vh = torch.linalg.svd(grad_weight, full_matrices=False)
        else:
            Y = _range(grad_weight, k, gen, iters=1)  # one power iteration: a sharper tail
            U_small, S, Vh = torch.linalg.svd(Y.T @ grad_weight, full_matrices=False)
            U = Y @ U_small
        rank = estimate_rank(S)
        if batch_size is not None or k >= full or rank <= k - _OVERSAMPLE // 2:
            break
        k = min(full, 2 * k)
    b = batch_size if batch_size is not None else rank
    b = max(1, min(b, S.numel()))
    tail = float(S[b] / S[b - 1]) if S.numel() > b and S[b - 1] > 0 else 0.0
    L = U[:, :b].contiguous()
    R = (S[:b, None] * Vh[:b]).contiguous()
    dof = (m - b) * (n - b)
    residual_rows = _residual_rows(grad_weight, L, R)
    noise_std = float(residual_rows.norm() / math.sqrt(dof)) if dof > 0 else 0.0
    return Factorisation(L, R, S, tail, noise_std, residual_rows), rank


def leading_singular_values(grad_weight: Tensor, b: int, seed: int, iters: int = 10) -> Tensor:
    """(b,) the leading singular values of grad_weight to within 1%, for the noise check on a noisy gradient.

    The factorisation's range finder (b + 10 columns, one power iteration) is sharp on an exact gradient, whose
    spectrum drops by orders of magnitude after b, but under noise it underestimates the weakest of the b: the
    noise's own singular values crowd just below them (measured at sigma 1e-4, b = 16: 0.94 of the noise's edge
    against 1.27 in a full SVD). 2b + 10 columns and `iters` power iterations: 10 put every value within 0.51% of
    the full SVD at sigma 1e-4, b = 24 and 32 (6: 1.5%), in 0.15-0.25 s at 1000 x 3072 (b = 16 and 32).
    """
    dW = grad_weight.to(_F64)
    Y = _range(dW, min(*dW.shape, 2 * b + 10), torch.Generator().manual_seed(seed), iters)
    return torch.linalg.svdvals(Y.T @ dW)[:b]


def _range(dW: Tensor, k: int, gen: torch.Generator, iters: int) -> Tensor:
    """(m, k) orthonormal basis of the range of dW (float64) sketched with k Gaussian columns (drawn on the CPU from
    `gen`, so every device draws the same), after `iters` power iterations. (Y^T dW)^T, not dW^T Y: the same product,
    but the transposed-A kernel of CPU BLAS falls 10-15x slower at some widths (float64, 1000 x 3072, k = 16-18 and
    42: 130-200 ms against 10-14 ms, measured), most of a small batch's whole call."""
    omega = torch.randn(dW.shape[1], k, generator=gen, dtype=_F64, device="cpu").to(dW.device)
    Y, _ = torch.linalg.qr(dW @ omega)
    for _ in range(iters):
        Y, _ = torch.linalg.qr(dW @ (Y.T @ dW).T)
    return Y


def _residual_rows(dW: Tensor, L: Tensor, R: Tensor) -> Tensor:
    """(m,) ||dW_j - l_j R|| per row: the m x n residual formed once, its subtraction inside the product."""
    return torch.linalg.vector_norm(torch.addmm(dW, L, R, alpha=-1), dim=1)


def zero_tolerance(noise_std: float, weakest: float, row_rms: float, dtype: torch.dtype) -> float:
    """Relative tolerance under which |<l_j, q>| / ||l_j|| counts as zero (unit q). No fixed cap.

    Noise model: dW = G X^T + N with N i.i.d. of standard deviation `noise_std` (estimated from the rank-b residual,
    see `Factorisation`). Then L = dW V_b S_b^-1, so <l_j, q> of a unit direction q carries noise of standard
    deviation noise_std * ||S_b^-1 q|| <= noise_std / s_b on every row (measured: the zeros of the true columns of
    G have exactly this spread, from float32 rounding up to DP noise of sigma = 1e-4). A zero is taken within
    `_ZERO_SIGMAS` of it, relative to a row of typical norm `row_rms`. The floor, a few hundred ulps of the
    gradient's dtype, is what the exact search was tuned on: it rules whenever the gradient is exact, so noise-free
    results and timings are those of the exact algorithm. The tolerance grows with 1/s_b only through noise: on an
    exact gradient an ill-conditioned batch (near-duplicate samples) does not widen it.
    """
    floor = 100 * torch.finfo(dtype).eps if dtype.is_floating_point else 1e-12
    noisy = _ZERO_SIGMAS * noise_std / max(weakest, 1e-300) / max(row_rms, 1e-300)
    return float(max(noisy, floor, 1e-12))


def zero_mask(unit_rows: Tensor, directions: Tensor, tol: float) -> Tensor:
    """(rows, c) bool: |<l_j, q>| <= tol for unit rows l_j and unit directions q (c, b)."""
    return (unit_rows @ directions.T).abs() <= tol


def refine(unit_rows: Tensor, directions: Tensor, mask: Tensor) -> Tensor:
    """Least-squares kernel of each direction's zero rows: the smallest eigenvector of sum_j l_j l_j^T.

    unit_rows: (m', b); directions: (c, b); mask: (m', c). Returns (c, b) unit directions with the sign of the input.
    """
    gram = torch.einsum("jc,ja,jb->cab", mask.to(_F64), unit_rows, unit_rows)
    _, vecs = torch.linalg.eigh(gram)
    q = vecs[:, :, 0]
    sign = torch.sign((q * directions).sum(1))
    return q * torch.where(sign == 0, 1.0, sign)[:, None]

@dataclass(frozen=True)
class Problem:
    """What selection and certification need, computed once per call (all float64).

    L: (m, b) orthonormal, R: (b, n), WR: (m, b) = W R^T, bias: (m,), grad_bias: (m,), Lt_bias: (b,) = L^T dbias,
    W_norm: (m,) row norms of W, unit_rows: (m, b) rows of L over their norms (0 for dead rows), tol: relative zero
    tolerance, fit_residual: ||dW - L R|| / ||dW||, noise_std: the noise estimate of `Factorisation`,
    singular_values: (b,) s_1..s_b, row_norm: (m,) ||l_j||, W: (m, n) the layer's weight.
    """

    L: Tensor
    unit_rows: Tensor
    R: Tensor
    WR: Tensor
    bias: Tensor
    grad_bias: Tensor
    Lt_bias: Tensor
    W_norm: Tensor
    tol: float
    fit_residual: float
    noise_std: float = 0.0
    singular_values: Tensor | None = None
    row_norm: Tensor | None = None
    W: Tensor | None = None
    floor: float = 0.0
    WR_after: Tensor | None = None
    bias_after: Tensor | None = None
    sampling_tol: float = 0.0
    row_rms: float = 1.0
    move_norm: Tensor | None = None
    move_bias: Tensor | None = None
    row_noise: Tensor | None = None
    bias_noise: float = 0.0


def prepare(weight: Tensor, bias: Tensor | None, grad_weight: Tensor, grad_bias: Tensor | None,
            batch_size: int | None, *, tol: float | None = None, seed: int = 0, weight_after: Tensor | None = None,
            bias_after: Tensor | None = None) -> tuple[Problem, Factorisation, int]:
    """Step 1 and everything fixed for one call: checks, float64 copies, dW = L R, the zero tolerance.

    Returns the Problem, the factorisation and the numerical rank of grad_weight. Raises AttackNotApplicable without
    a bias or when b >= min(m, n); ValueError when the shapes are not those of an nn.Linear.
    """
    if bias is None or grad_bias is None:
        raise AttackNotApplicable("spear needs the layer's bias and its gradient (the bias fixes each sample's scale)")
    m, n = weight.shape
    if tuple(grad_weight.shape) != (m, n) or tuple(bias.shape) != (m,) or tuple(grad_bias.shape) != (m,):
        raise ValueError(f"shapes do not match nn.Linear: weight {tuple(weight.shape)}, bias {tuple(bias.shape)}, "
                         f"grad_weight {tuple(grad_weight.shape)}, grad_bias {tuple(grad_bias.shape)}")
    if batch_size is not None and batch_size >= min(m, n):
        raise AttackNotApplicable(f"spear needs batch size b < min(m, n) = {min(m, n)} for a {m}x{n} layer, "
                                  f"got b={batch_size}")
    if not (torch.isfinite(grad_weight).all() and torch.isfinite(grad_bias).all()):  # before the float64 copy
        raise AttackNotApplicable("spear needs a finite gradient (the update holds NaN or inf)")
    W, bias64 = weight.detach().to(_F64), bias.detach().to(_F64)
    dW, db = grad_weight.detach().to(_F64), grad_bias.detach().to(_F64)
    fact, rank = factorise(dW, batch_size, torch.Generator().manual_seed(seed))
    b = fact.L.shape[1]
    if b >= min(m, n):  # an estimated rank this large is noise, not a batch: keep the largest admissible b
        b = min(m, n) - 1
        fact = Factorisation(fact.L[:, :b].contiguous(), fact.R[:b].contiguous(), fact.singular_values, 1.0,
                             fact.noise_std)
    L = fact.L
    row_norm = L.norm(dim=1)
    active = row_norm > row_norm.max().clamp_min(1e-300) * 1e-6  # rows of dead ReLUs are zero up to rounding
    unit_rows = torch.zeros_like(L)
    unit_rows[active] = L[active] / row_norm[active, None]
    residual_rows = fact.residual_rows if fact.residual_rows is not None else _residual_rows(dW, L, fact.R)
    fit_res = float(residual_rows.norm() / dW.norm().clamp_min(1e-300))
    # Each row's own noise level: float32 rounding scales with the row's magnitude, so rows where large samples are
    # active carry more of it than the average `noise_std` says (used by `sample_errors`).
    row_noise = residual_rows / math.sqrt(max(n - b, 1))
    # The bias gradient's noise per entry, from its part outside the span of L (dbias = G 1 lies within it): it
    # sets the samples' scales, and a sample with a small gradient column takes its scale from a small component.
    bias_noise = float((db - L @ (L.T @ db)).norm() / math.sqrt(max(m - b, 1)))
    S_b = fact.singular_values[:b].clamp_min(1e-300)
    row_rms = float(row_norm[active].pow(2).mean().sqrt()) if bool(active.any()) else 1.0
    noise_tol = zero_tolerance(fact.noise_std, float(S_b[-1]), row_rms, grad_weight.dtype)
    # The sampling search screens angles from (b-2)-row solves, far less precise than the rows themselves: on an
    # exact gradient it keeps the tolerance it was tuned with, 30 x s_{b+1} / s_b within [floor, 1e-3].
    floor = zero_tolerance(0.0, 1.0, 1.0, grad_weight.dtype)
    # Capped at 10x the noise's own tolerance: s_{b+1} / s_b grows with ill-conditioning (similar samples), and a
    # band that wide lets mixes of columns pass the screen (measured on a FedAvg delta: 3.6e-4 never certified in
    # 240k samples, 1.2e-4 certified in 8k).
    sampling_tol = float(min(1e-3, max(30.0 * fact.noise, floor), 10.0 * max(noise_tol, floor)))
    problem = Problem(
        L=L, unit_rows=unit_rows, R=fact.R, WR=W @ fact.R.T, bias=bias64, grad_bias=db, Lt_bias=L.T @ db,
        W_norm=W.norm(dim=1), tol=tol if tol is not None else noise_tol, fit_residual=fit_res,
        sampling_tol=tol if tol is not None else sampling_tol, row_rms=row_rms,
        noise_std=fact.noise_std, singular_values=S_b, row_norm=row_norm, W=W,
        floor=floor, row_noise=row_noise, bias_noise=bias_noise,
        WR_after=None if weight_after is None else weight_after.detach().to(_F64) @ fact.R.T,
        bias_after=None if weight_after is None else (bias64 if bias_after is None else bias_after.detach().to(_F64)),
        move_norm=None if weight_after is None else (weight_after.detach().to(_F64) - W).norm(dim=1),
        move_bias=None if weight_after is None else (
            (bias_after.detach().to(_F64) - bias64).abs() if bias_after is not None else torch.zeros_like(bias64)))
    return problem, fact, rank




def direction_noise(problem: Problem, directions: Tensor) -> Tensor:
    """Standard deviation of the noise on <l_j, q> for each unit direction q (c, b): noise_std * ||S_b^-1 q||,
    never below the dtype floor of the zero test (see `zero_tolerance`). Returns (c,), absolute (raw rows of L)."""
    S = problem.singular_values
    floor = problem.floor * problem.row_rms
    return (problem.noise_std * (directions / S[None, :]).norm(dim=1)).clamp_min(floor / _ZERO_SIGMAS)


def noisy_zero_mask(problem: Problem, L: Tensor, directions: Tensor) -> Tensor:
    """(m', c) bool: |<l_j, q>| within `_ZERO_SIGMAS` noise standard deviations of zero (raw rows, per direction)."""
    return (L @ directions.T).abs() <= _ZERO_SIGMAS * direction_noise(problem, directions)[None, :]
