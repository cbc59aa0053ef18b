"""SPEAR: exact gradient inversion of a batch through a Linear+ReLU layer (Dimitrov et al., arXiv 2403.03945).

Setting (paper, Sec. 3). The attacked layer is `Z = W X + bias 1^T` with `W: (m, n)`, `X: (n, b)` the batch as
columns, followed by a ReLU. The client shares `dW = G X^T` (rank b) and `dbias = G 1`, where `G = dL/dZ: (m, b)` is
exactly zero wherever `Z <= 0`. Any rank-b factorisation `dW = L R` has a unique invertible `Q: (b, b)` with
`G = L Q` and `X^T = Q^-1 R` (the disaggregation matrix). SPEAR finds the columns of Q one direction at a time:

1. factorise `dW = L R` (rank b; a randomised range finder, since the rank is small);
2. sample submatrices of L on rows that lie in the zero set of one column of G: their kernel is that column's
   direction (Lemma: `L_A q_i = 0` for `A` inside the zeros of `g_i`);
3. filter proposals by sparsity: a true direction makes `L q` zero on about half of the rows (>= tau * m');
4. greedily select b directions (stage 1: sparsest first; stage 2: swaps when stage 1 is inconsistent);
5. fix scales and signs from the bias gradient, `dbias = L Q 1`, and output `X^T = Q^-1 R`;
6. certify: the recomputed `W X + bias` must be negative exactly where `G = L Q` is zero.

Deviations from the paper (all keep the algorithm's sampling distribution and its filter):

* Proposals come in families. A family is a random set B of b-2 active rows; its kernel is 2-dimensional and
  every (b-1)-row proposal B + {j} has its kernel inside it, at the angle where row j vanishes. Rows that lie in
  the zero set of the same column of G share that angle exactly, so a family is screened by looking for two rows
  of a random row subset S with the same angle, the paper's "filter on a few rows first" done for all |S|
  proposals of a family with one factorisation. A family reveals column i when B lies in its zero set, with
  probability about rho^(b-2) instead of rho^(b-1) for a single proposal: half the factorisations at rho = 1/2.
* Sparsity is counted over active rows (rows of dW that are not zero for the whole batch: dead ReLUs carry no
  information and are zero for every direction), so tau is a fraction of the active rows m'.
* Accepted directions are refined as the least-squares kernel of all rows found zero before de-duplication, so
  they are accurate to the precision of the gradient rather than to that of a (b-1)-row solve.

Full strength on what defenses and training do to an update (issue "SPEAR at full strength"):

* Noise. The entries of dW outside its rank-b part estimate the noise level (`Factorisation.noise_std`); with
  L = dW V_b S_b^-1 the noise on <l_j, q> is noise_std ||S_b^-1 q|| on every row, which is what the zeros of the
  true columns measure (float32 rounding to DP noise of sigma 1e-4). Every tolerance derives from it, with no cap
  (`zero_tolerance`). On a noisy gradient no exact answer exists and SPEAR's sampling screen, which reads angles
  off (b-2)-row solves, loses the columns; there the dictionary solver runs (`DictionarySearch`): the columns are
  the sharp minima of ||L q||_1 on the sphere, reached by IRLS from random starts and refined as the weighted
  least-squares kernels of their zero rows, so the answer averages the noise of hundreds of rows. Below the noise's
  own largest singular value the batch's weakest direction is gone (`stop_reason` "noise"): SPEAR says so in
  seconds instead of spending its budget.
* FedAvg. -delta / lr over T local steps is sum_t G_t X_t^T: rank = distinct samples (`distinct_samples`), right
  factor = the inputs, dbias = the column sums; only the ReLU patterns move with W. The certificate judges a
  pre-activation only where its sign holds at both ends of the round with a margin as wide as the movement.
* Aggregates: a secure aggregate of k clients is one batch of the summed size, attacked at the default budget.
* Budgets are counted (samples or IRLS starts), so an answer does not depend on the machine; the wall-clock cap is
  a safety net that the result reports (`budget_exhausted`, `stop_reason`).

The certificate (`certified=True` implies every returned sample is one of the batch's to relative error 1e-3):
(1) the sign pattern of W x + bias agrees with the zeros of G = L Q (paper, Sec. 4), judged outside noise bands;
(2) the bias relation holds; (3) each sample is pinned: its column is the least-squares kernel of its zero rows
Z_i, and noise of the measured level on those rows moves it by about s_i sqrt(sum_k>=2 1/lambda_k(L_Z^T L_Z)),
carried to x_i through Q^-1 (`sample_errors`); all estimates times 10 must stay within 1e-3. The zero set for (3)
uses the noise's own threshold, never the search's looser tolerance, so it does not grow with ill-conditioning.
Why (3): near-duplicate samples have zero sets that differ on a few rows; a direction between their columns is
zero on the intersection and passes (1) and (2), since the pre-activations that tell them apart are near zero.
Its zero set then has a second, almost-null direction (lambda_2 ~ 0): the estimate is large and the sample is not
certified. tests/test_spear.py checks near-duplicates at several distances and seeds, noisy, multi-step and
aggregated updates, and a fuzz over random batches: no certified answer is wrong. The per-sample estimates are
returned (`sample_errors`) as a confidence; they track the real errors (3e-8 estimated vs 2.6e-8 measured on an
exact batch of 12 natural-image crops).

`reconstruct` is the pure algorithm on tensors; the `Spear` attack wraps it for `fedsim` observations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import Attack, register_attack
from fedsim.schema import knob
from fedsim.errors import AttackNotApplicable
from fedsim.threat import Observation, Reconstruction, TrainMeta
from fedsim.training import single_thread

_F64 = torch.float64
_ZERO_SIGMAS = 4.5         # a zero of L q lies within this many noise standard deviations of 0 (Gaussian noise)
_NOISE_FLOOR = 1.02        # S_b below this many times the noise's largest singular value: the b-th direction is lost
_EXACT = 1e-3              # relative error up to which a sample counts as exact (as fedsim.metrics' `exact`)
_F32_FLOOR = 100 * torch.finfo(torch.float32).eps   # the exact regime's zero tolerance on float32 gradients
_SAMPLING_MAX_TOL = 1e-3   # auto: the sampling search's tolerance cap; noisier updates go to the dictionary solver
_DICTIONARY_AFTER = 100_000  # sampled families after which the sampling search also runs IRLS rounds
_SAMPLING_MAX_B = 24       # auto: above this b SPEAR's ~2^b sampling costs minutes (BENCHMARKS.md); IRLS takes over
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
    stop_reason: certified, converged (noisy gradient, further search changed nothing), noise (the batch's
    weakest direction is below the noise's singular values), solved (b <= 2), samples or seconds (budgets).
    solver: the search that ran (sampling or dictionary); noise_limited: the noise-floor case of stop_reason.
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
    """

    L: Tensor
    R: Tensor
    singular_values: Tensor
    noise: float
    noise_std: float = 0.0


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
            omega = torch.randn(n, k, generator=gen, dtype=_F64)
            Y, _ = torch.linalg.qr(grad_weight @ omega)
            Y, _ = torch.linalg.qr(grad_weight @ (grad_weight.T @ Y))  # one power iteration: sharper tail
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
    noise_std = float(torch.linalg.matrix_norm(grad_weight - L @ R) / math.sqrt(dof)) if dof > 0 else 0.0
    return Factorisation(L, R, S, tail, noise_std), rank


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


# --- steps 2-3: sampling families of proposals and the sparsity filter -------------------------------------------------

def family_kernels(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Kernels of many (b-2) x b submatrices at once (batched LU solves).

    rows: (K, b-2, b) float64. The kernel of each is spanned by u = [-y_0; 1; 0] and v = [-y_1; 0; 1] with
    y = rows[:, :, :b-2]^-1 rows[:, :, b-2:]. Returns y: (K, b-2, 2) and ok: (K,) bool (non-singular, finite).
    """
    d = rows.shape[1]
    y, info = torch.linalg.solve_ex(rows[:, :, :d], rows[:, :, d:])
    ok = (info == 0) & torch.isfinite(y).all(dim=(1, 2))
    return y, ok


def plane_coordinates(subset_rows: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Coordinates of each subset row in an orthonormal basis (e1, e2) of each family's 2-D kernel.

    subset_rows: (s, b) unit rows; y: (K, b-2, 2) from `family_kernels`. Row j of family k has coordinates
    (<l_j, e1>, <l_j, e2>); its proposal B + {j} has the kernel direction orthogonal to them inside the plane.
    Returns p1, p2: (s, K) and the Cholesky factors c = (c11, c12, c22): (3, K) of the basis (u, v).
    """
    d = y.shape[1]
    K = y.shape[0]
    head, tail = subset_rows[:, :d], subset_rows[:, d:]
    # <l_j, u> = -<l_j[:d], y0> + l_j[d], <l_j, v> = -<l_j[:d], y1> + l_j[d+1]: one GEMM for all families.
    proj = (head @ y.permute(1, 0, 2).reshape(d, 2 * K)).view(-1, K, 2)
    lu = tail[:, 0:1] - proj[..., 0]
    lv = tail[:, 1:2] - proj[..., 1]
    y0, y1 = y[..., 0], y[..., 1]
    c11 = torch.sqrt(1.0 + (y0 * y0).sum(1))
    c12 = (y0 * y1).sum(1) / c11
    c22 = torch.sqrt((1.0 + (y1 * y1).sum(1) - c12 * c12).clamp_min(1e-300))
    p1 = lu / c11
    p2 = (lv - c12 * p1) / c22
    return p1, p2, torch.stack((c11, c12, c22))


def line_angles(p1: Tensor, p2: Tensor) -> Tensor:
    """Angle in [0, pi) of each row's line in the plane; NaN for rows (almost) orthogonal to the plane.

    p1, p2: (s, K). A row with |p| < `_MIN_PLANE_NORM` is zero for every direction of the plane (it lies in the
    zero set of both columns the plane may hold); its angle is rounding noise and must not form pairs.
    """
    theta = torch.atan2(p2, p1).remainder_(math.pi)
    return theta.masked_fill_(p1 * p1 + p2 * p2 < _MIN_PLANE_NORM ** 2, math.nan)


def sorted_gaps(theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort angles (s, K) per family (NaN last); gap before each sorted angle, the first one across the wrap.

    Returns (sorted angles, their row indices, gaps) all (s, K); gaps of NaN angles are NaN (never small).
    """
    theta, order = theta.sort(dim=0)
    last = torch.where(torch.isnan(theta), -math.inf, theta).max(dim=0).values
    gaps = torch.empty_like(theta)
    gaps[1:] = theta.diff(dim=0)
    gaps[0] = theta[0] + math.pi - last
    return theta, order, gaps


def flag_families(p1: Tensor, p2: Tensor, tol: float, min_run: int = 2) -> Tensor:
    """Families in which `min_run` rows share an angle (to `tol` radians): a proposal with that many extra zeros.

    p1, p2: (s, K). Angles are taken modulo pi (a line, not a ray); sorted per family, a repeated angle shows as a
    small gap (the wrap-around gap counts for pairs). Returns (K,) bool.
    """
    _, _, gaps = sorted_gaps(line_angles(p1, p2))
    close = gaps < tol
    if min_run == 2:
        return close.any(dim=0)
    run = close                                                  # run[i]: gaps i .. i+k-1 all small
    for k in range(1, min_run - 1):
        run = run[:-1] & close[k:]
    return run.any(dim=0)


def plane_directions(y: Tensor, chol: Tensor, angle: Tensor, fam: Tensor) -> Tensor:
    """Unit direction of family `fam` orthogonal to rows at `angle` inside its plane. Returns (c, b)."""
    # A row at angle t has unit coordinates (cos t, sin t) in (e1, e2); the proposal's direction is (-sin t, cos t).
    w1, w2 = -torch.sin(angle), torch.cos(angle)
    c11, c12, c22 = chol[:, fam]
    yf = y[fam]
    ones, zeros = torch.ones_like(w1)[:, None], torch.zeros_like(w1)[:, None]
    u = torch.cat((-yf[..., 0], ones, zeros), dim=1)
    v = torch.cat((-yf[..., 1], zeros, ones), dim=1)
    e1 = u / c11[:, None]
    e2 = (v - c12[:, None] * e1) / c22[:, None]
    q = w1[:, None] * e1 + w2[:, None] * e2
    return q / q.norm(dim=1, keepdim=True)


def plane_runs(p1: Tensor, p2: Tensor, tol: float, min_run: int, min_zeros: int) -> tuple[Tensor, Tensor, Tensor]:
    """Runs of equal angles among all active rows of each family's plane: the full count of step 3.

    p1, p2: (m', F) coordinates of every active row in each flagged family's plane. A run of r rows at angle t is
    one proposal B + {j} with r zeros beyond the rows that vanish on the whole plane ("common": B itself and, when
    B lies in the zero sets of two columns, their intersection). Every direction of such a plane is zero on the
    common rows, so only the run says that the direction is a column of G: runs shorter than `min_run` are
    coincidences, and a proposal needs run + common >= `min_zeros` zeros in all (the paper's filter).
    Returns angle (c,), family index (c,), common: (m', c) bool, for the runs that pass.
    """
    theta = line_angles(p1, p2)
    common = torch.isnan(theta)
    theta, _, gaps = sorted_gaps(theta)
    close = gaps < tol
    close[0] = False                                            # runs across the wrap are split (rare, harmless)
    run_id = torch.cumsum(~close, dim=0) - 1                    # (m', F), runs numbered from 0 per family
    lengths = torch.zeros(p1.shape[1], p1.shape[0], dtype=torch.long)
    lengths.scatter_add_(1, run_id.T, (~torch.isnan(theta)).T.long())
    n_common = common.sum(0)
    passes = (lengths >= min_run) & (lengths + n_common[:, None] >= min_zeros)       # (F, runs)
    start = ~close & passes.T.gather(0, run_id)
    pos, fam = torch.nonzero(start, as_tuple=True)
    return theta[pos, fam], fam, common[:, fam]


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


@dataclass
class Candidates:
    """Distinct directions that passed the sparsity filter (paper: the candidate pool C).

    directions: (c, b) unit; counts: (c,) zeros of L q among active rows; masks: (m, c) zero pattern of L q over
    all rows (dead rows are zero); dominated: (c,) the zero set lies inside another candidate's (see `prune`).
    `version` changes whenever the pool changes.
    """

    directions: Tensor
    counts: Tensor
    masks: Tensor
    dominated: Tensor
    keep_dominated: int
    version: int = 0

    @classmethod
    def empty(cls, m: int, b: int) -> "Candidates":
        return cls(torch.empty(0, b, dtype=_F64), torch.empty(0, dtype=torch.long),
                   torch.empty(m, 0, dtype=torch.bool), torch.empty(0, dtype=torch.bool), keep_dominated=2 * b)

    def __len__(self) -> int:
        return self.directions.shape[0]

    def add(self, directions: Tensor, counts: Tensor, masks: Tensor) -> None:
        if directions.shape[0] == 0:
            return
        before = self.directions
        self.directions = torch.cat((self.directions, directions))
        self.counts = torch.cat((self.counts, counts))
        self.masks = torch.cat((self.masks, masks), dim=1)
        self.prune()
        if self.directions.shape != before.shape or not torch.equal(self.directions, before):
            self.version += 1

    def prune(self) -> None:
        """Flag directions whose zero set lies inside another's; keep only the sparsest few of those.

        A mix of columns of G is zero only where all of them are (and on the at most b-1 rows its proposal
        forced), so its zero set lies inside each one's up to those rows. On
        correlated data (small b, similar samples) such mixes can be as sparse as a column and each family may
        propose a different one; they are kept out of the greedy choice and their number is capped. A column
        whose zero set happens to lie inside another column's stays among the kept ones (stage 2 can use it).
        """
        masks = self.masks.to(_F64)
        inside = masks.T @ masks                                        # (c, c): |Z_i & Z_k|
        sizes = masks.sum(0)
        # A mix of k columns is zero on their intersection plus the k-1 rows its proposal forced (at most b-1).
        slack = (self.directions.shape[1] - 1) + 0.01 * sizes
        dominated = ((sizes[:, None] - inside) <= slack[:, None]) & (sizes[None, :] > sizes[:, None])
        self.dominated = dominated.any(dim=1)
        order = torch.argsort(self.counts, descending=True, stable=True)
        rank_in_dominated = torch.cumsum(self.dominated[order].long(), 0)
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[order] = ~self.dominated[order] | (rank_in_dominated <= self.keep_dominated)
        if not bool(keep.all()):
            self.directions, self.counts = self.directions[keep], self.counts[keep]
            self.masks, self.dominated = self.masks[:, keep], self.dominated[keep]

    def dominance(self, masks: Tensor, rows: Tensor) -> tuple[Tensor, int]:
        """For new zero patterns masks: (r, c) on `rows`: which lie inside a known candidate's (as in `prune`), and
        the zero count a dominated direction must exceed to enter the pool (-1 while the pool has room)."""
        if len(self) == 0:
            return torch.zeros(masks.shape[1], dtype=torch.bool), -1
        known = self.masks[rows].to(_F64)
        new = masks.to(_F64)
        inside = new.T @ known                                          # (c, k)
        sizes, known_sizes = new.sum(0), known.sum(0)
        slack = (self.directions.shape[1] - 1) + 0.01 * sizes
        dominated = ((sizes[:, None] - inside) <= slack[:, None]) & (known_sizes[None, :] > sizes[:, None])
        kept = self.counts[self.dominated]
        floor = int(kept.sort(descending=True).values[self.keep_dominated - 1]) if kept.numel() >= self.keep_dominated else -1
        return dominated.any(dim=1), floor

    def order(self) -> list[int]:
        """Stage-1 order: directions not dominated first, each group sparsest first."""
        key = self.dominated.to(torch.long) * (1 << 40) - self.counts
        return torch.argsort(key, stable=True).tolist()


# --- steps 4-6: selection, scales, certificate -------------------------------------------------------------------------

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


def disaggregate(problem: Problem, directions: Tensor) -> tuple[Tensor, Tensor]:
    """Step 5: scales and signs from the bias gradient, for a batch of selections.

    directions: (P, b, b), unit columns (Q-bar). dbias = G 1 = L Q-bar s and L has orthonormal columns, so
    s = Q-bar^-1 L^T dbias. Returns Q = Q-bar diag(s): (P, b, b) and ok: (P,) False where Q-bar is singular or a
    scale is zero (that sample could not be inverted).
    """
    rhs = problem.Lt_bias.expand(directions.shape[0], -1)[..., None]
    s, info = torch.linalg.solve_ex(directions, rhs)
    s = s[..., 0]
    ok = (info == 0) & torch.isfinite(s).all(dim=1) & (s != 0).all(dim=1)
    return directions * s[:, None, :], ok


def certify(problem: Problem, Q: Tensor) -> tuple[Tensor, Tensor]:
    """Step 6, for a batch of candidate disaggregations Q: (P, b, b), invertible.

    The recovered pre-activations Z = W X + bias (X^T = Q^-1 R, computed as (W R^T) Q^-T + bias) must be negative
    exactly where the recovered output gradient G = L Q is zero. Each side has an undecided band: an entry of G is
    zero when |<l_j, q_i>| <= tol/30 (unit row, unit column; about the rounding of the observed gradient) and
    non-zero above tol, and Z is negative below -tol (|w_j| |x_i| + |bias_j|) and positive above it; an active unit
    may carry a tiny gradient, so entries inside a band are not judged. A violation is an entry of G that is zero
    where Z is positive, or non-zero where Z is negative. Returns violations (P,) and the bias residuals
    ||G 1 - dbias|| / ||dbias|| (P,).
    """
    Qinv, _ = torch.linalg.inv_ex(Q)
    x_norm = (Qinv @ problem.R).norm(dim=2)                                        # (P, b)
    Z = problem.WR @ Qinv.mT + problem.bias[:, None]                               # (P, m, b)
    band = problem.tol * (problem.W_norm[:, None] * x_norm[:, None, :] + problem.bias.abs()[:, None])
    qbar = Q / Q.norm(dim=1, keepdim=True)
    dots = (problem.unit_rows @ qbar).abs()                                         # (P, m, b)
    if problem.noise_std > 0 and problem.singular_values is not None:
        # A row of small norm carries the same absolute noise as any other (see `zero_tolerance`): its relative
        # value can exceed tol on a true zero. An entry within the noise is left undecided (in neither band).
        sigma = problem.noise_std * (qbar / problem.singular_values[None, :, None]).norm(dim=1)        # (P, b)
        raw = dots * problem.row_norm[None, :, None]
        undecided = (raw <= _ZERO_SIGMAS * sigma[:, None, :]) & (dots > problem.tol / 30)
        dots = torch.where(undecided, torch.full_like(dots, problem.tol / 2), dots)
    positive, negative = Z > band, Z < -band
    if problem.WR_after is not None:
        # Several local steps: a sample's ReLU pattern was set at some step in between. Judge only entries whose
        # sign holds at both ends with a margin as wide as the movement itself (an intermediate step cannot cross).
        # A step may move Z by more than the round's net change (a later step can take it back), so the margin
        # is the Cauchy-Schwarz bound of the whole movement, ||dW_j|| ||x_i|| + |db_j|, not |Z_after - Z|.
        Z_after = problem.WR_after @ Qinv.mT + problem.bias_after[:, None]
        wide = band + (problem.move_norm[:, None] * x_norm[:, None, :] + problem.move_bias[:, None])
        positive = (Z > wide) & (Z_after > wide)
        negative = (Z < -wide) & (Z_after < -wide)
    wrong = ((dots <= problem.tol / 30) & positive) | ((dots > problem.tol) & negative)
    bias_res = (Q.sum(2) @ problem.L.T - problem.grad_bias).norm(dim=1)
    return wrong.sum(dim=(1, 2)), bias_res / problem.grad_bias.norm().clamp_min(1e-300)


def score(problem: Problem, cands: Candidates, sels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Certificates of selections sels: (P, b) indices into `cands`.

    Returns violations (P,) (a huge number where the selection cannot be inverted), bias residuals (P,), Q (P, b, b).
    """
    Q, ok = disaggregate(problem, cands.directions[sels].mT)
    Q = torch.where(ok[:, None, None], Q, torch.eye(Q.shape[1], dtype=_F64))
    mismatches, bias_res = certify(problem, Q)
    return torch.where(ok, mismatches, torch.iinfo(torch.long).max), bias_res, Q


def independent_greedy(directions: Tensor, order: list[int], b: int, tol: float) -> list[int]:
    """Stage 1: walk candidates in `order`, keep those linearly independent of the kept ones (up to b)."""
    basis = torch.empty(directions.shape[1], 0, dtype=_F64)
    chosen: list[int] = []
    for i in order:
        q = directions[i]
        r = q - basis @ (basis.T @ q)
        norm = float(r.norm())
        if norm > tol:
            basis = torch.cat((basis, (r / norm)[:, None]), dim=1)
            chosen.append(i)
            if len(chosen) == b:
                break
    return chosen


@dataclass(frozen=True)
class Selection:
    """b chosen candidates (indices), their disaggregation Q (b, b), its certificate, and the stage (1 or 2)."""

    indices: list[int]
    consistency: Consistency
    Q: Tensor
    stage: int


def select(problem: Problem, cands: Candidates, b: int, swaps: int = 4, batch: int = 128) -> Selection | None:
    """Step 4: greedy selection of b directions; stage 2 swaps candidates in while stage 1 is inconsistent.

    Stage 2 scores every single swap (position <- one of the 2b best-ranked unused candidates) at once and keeps
    the one with the fewest sign violations, up to `swaps` rounds. None with fewer than b independent candidates.
    """
    order = cands.order()
    sel = independent_greedy(cands.directions, order, b, min(0.1, max(1e-6, 100 * problem.tol)))
    if len(sel) < b:
        return None
    mism, bias_res, Q = score(problem, cands, torch.tensor([sel]))
    if int(mism[0]) == torch.iinfo(torch.long).max:
        return None
    best = Selection(sel, Consistency(int(mism[0]), float(bias_res[0])), Q[0], 1)
    for _ in range(swaps):
        others = [i for i in order if i not in best.indices][: 2 * b]
        if best.consistency.mismatches == 0 or not others:
            break
        base = torch.tensor(best.indices)
        trials = base.repeat(b * len(others), 1)
        pos = torch.arange(b).repeat_interleave(len(others))
        trials[torch.arange(trials.shape[0]), pos] = torch.tensor(others).repeat(b)
        results = [score(problem, cands, part) for part in trials.split(batch)]
        mism = torch.cat([r[0] for r in results])
        k = int(torch.argmin(mism))
        if int(mism[k]) >= best.consistency.mismatches:
            break
        part, off = divmod(k, batch)
        best = Selection(trials[k].tolist(), Consistency(int(mism[k]), float(results[part][1][off])),
                         results[part][2][off], 2)
    return best


def best_effort(problem: Problem, cands: Candidates, b: int, gen: torch.Generator) -> Tensor:
    """Fewer than b usable candidates at the budget: keep the independent ones, complete with random directions.

    Returns an invertible Q (b, b), scaled from the bias gradient unless that fit is singular.
    """
    sel = independent_greedy(cands.directions, cands.order(), b, 1e-6) if len(cands) else []
    cols = [cands.directions[i] for i in sel]
    while len(cols) < b:
        basis = torch.stack(cols, dim=1) if cols else torch.empty(b, 0, dtype=_F64)
        r = torch.randn(b, generator=gen, dtype=_F64)
        r = r - basis @ (basis.T @ r)
        if float(r.norm()) > 1e-6:
            cols.append(r / r.norm())
    directions = torch.stack(cols, dim=1)
    Q, ok = disaggregate(problem, directions[None])
    return Q[0] if bool(ok[0]) else directions


# --- the search -------------------------------------------------------------------------------------------------------

@dataclass
class Search:
    """Steps 2-3 for one call: the active rows of L, the filter's thresholds and the running candidate pool.

    act_rows: (m', b) unit rows of L on active rows; pool: (m',) their row indices in 0..m-1; min_zeros: the
    sparsity filter's threshold tau * m'; min_run: zeros a direction needs outside its family's common rows;
    tol: tight zero tolerance; pair_tol, count_tol: the looser tolerances of screening (angles from a (b-2)-row
    solve) and of the first full count, before refinement.
    """

    act_rows: Tensor
    pool: Tensor
    m: int
    min_zeros: int
    tol: float
    pair_tol: float
    count_tol: float
    cands: Candidates
    min_run: int
    samples: int = 0
    proposals: int = 0
    cond_masks: Tensor | None = None

    def accept(self, q: Tensor, common: Tensor) -> None:
        """Full count of proposal directions q (c, b); refine; keep those passing the sparsity filter.

        common: (m', c) rows zero on the proposal's whole family plane. A direction passes with at least
        `min_zeros` zeros in all and `min_run` of them outside its common rows (see `plane_runs`).
        """
        fresh = ~_parallel_to(q, self.cands.directions)
        q, common = q[fresh], common[:, fresh]
        if q.shape[0] == 0:
            return
        # A proposal whose zero set already lies inside a known candidate's is a mix (see `Candidates.prune`);
        # unless it would rank among the dominated directions the pool keeps, skip its refinement.
        dominated, floor = self.cands.dominance(zero_mask(self.act_rows, q, self.count_tol), self.pool)
        keep = ~dominated | (zero_mask(self.act_rows, q, self.count_tol).sum(0) > floor)
        q, common = q[keep], common[:, keep]
        if q.shape[0] == 0:
            return
        # Least squares on the rows found zero, under a narrowing tolerance: a non-zero row that slipped under the
        # loose one biases the first fit and is then left out (the certificate wants zeros at tol / 30).
        for tol in (self.count_tol, self.tol, self.tol / 10):
            q = refine(self.act_rows, q, zero_mask(self.act_rows, q, tol))
        tight = zero_mask(self.act_rows, q, self.tol)
        counts = tight.sum(0)
        keep = (counts >= self.min_zeros) & ((tight & ~common).sum(0) >= self.min_run)
        q, tight, counts = q[keep], tight[:, keep], counts[keep]
        keep = ~_parallel_to(q, self.cands.directions) & ~_parallel_to_earlier(q)
        if bool(keep.any()):
            masks = torch.ones(self.m, int(keep.sum()), dtype=torch.bool)
            masks[self.pool] = tight[:, keep]
            self.cands.add(q[keep], counts[keep], masks)

    def examine(self, rows: Tensor, y: Tensor, chol: Tensor, cond: Tensor) -> None:
        """Full count of the families whose screening flagged a shared angle.

        rows: (r,) active-row indices where the families' columns can vanish (all active rows, or the zero set of
        the conditioning directions `cond` (f, b), see `sample`); y, chol: the families' planes.
        """
        p1, p2, _ = plane_coordinates(self.act_rows[rows], y)
        local_zeros = max(self.min_run, math.ceil(self.min_zeros * rows.numel() / self.act_rows.shape[0]))
        # Inside a deflated family's rows a column's run is about half of them; short runs there are mostly mixes
        # of two similar samples' columns, which would cost a lift each and fail the filter anyway.
        local_run = self.min_run if cond.shape[0] == 0 else max(self.min_run, math.ceil(0.2 * rows.numel()))
        angle, fam, common_local = plane_runs(p1, p2, self.pair_tol, local_run, local_zeros)
        if angle.numel() == 0:
            return
        q = plane_directions(y, chol, angle, fam)
        # Many families of a batch find the same column, mostly one already known: drop those before the
        # costlier steps. In a deflated family a known column shows as its projection off the conditioning ones.
        known = self.cands.directions
        if cond.shape[0]:
            basis, _ = torch.linalg.qr(cond.T)
            known = known - (known @ basis) @ basis.T
            known = known[known.norm(dim=1) > 1e-6]
            known = known / known.norm(dim=1, keepdim=True)
        fresh = ~_parallel_to(q, known) & ~_parallel_to_earlier(q)
        q, common_local = q[fresh], common_local[:, fresh]
        if q.shape[0] == 0:
            return
        common = torch.zeros(self.act_rows.shape[0], q.shape[0], dtype=torch.bool)
        common[rows] = common_local
        if cond.shape[0]:
            q, ok = lift(self.act_rows, q, cond, self.cond_masks, self.pair_tol, self.min_run)
            q, common = q[ok], common[:, ok]
        self.accept(q, common)

    def screen_plane(self) -> None:
        """b = 2: the kernel of no rows is the whole plane; one family, counted on every active row."""
        chol = torch.tensor([[1.0], [0.0], [1.0]], dtype=_F64)
        self.examine(torch.arange(self.act_rows.shape[0]), torch.empty(1, 0, 2, dtype=_F64), chol,
                     torch.empty(0, 2, dtype=_F64))
        self.samples, self.proposals = 1, self.act_rows.shape[0]

    def conditioning(self, subset: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Found directions to condition the next families on, and the active rows in all of their zero sets.

        Non-dominated candidates are taken in random order while their common zero set keeps enough rows to draw
        a family and screen it. Returns cond: (f, b) (f may be 0) and rows: (r,) active-row indices.
        """
        m_act, b = self.act_rows.shape
        free = torch.nonzero(~self.cands.dominated).flatten()
        free = free[torch.randperm(free.numel(), generator=gen)]
        inside = torch.ones(m_act, dtype=torch.bool)
        chosen: list[int] = []
        zeros = self.cands.masks[self.pool]
        for c in free.tolist():
            if b - 3 - len(chosen) < 1:
                break
            both = inside & zeros[:, c]
            if int(both.sum()) < (b - 3 - len(chosen)) + subset + 8:
                continue
            inside = both
            chosen.append(c)
        self.cond_masks = zeros[:, chosen]
        return self.cands.directions[chosen], torch.nonzero(inside).flatten()

    def sample(self, K: int, subset: int, gen: torch.Generator, deflate: bool = False) -> None:
        """Draw K families and screen their proposals on a fresh random subset of rows (steps 2-3).

        A family is b-2 random active rows. With `deflate`, f found directions q_C join as constraints and the
        b-2-f rows are drawn inside their common zero set: L_j q_k = 0 there, so the lemma holds in the quotient
        by q_C and a family reveals column i when its rows lie in zeros_i (probability rho^(b-2-f), not rho^(b-2));
        the direction found is q_i projected off q_C, lifted back by `lift`.
        """
        m_act, b = self.act_rows.shape
        cond, rows = self.conditioning(subset, gen) if deflate else (torch.empty(0, b, dtype=_F64),
                                                                      torch.arange(m_act))
        d = b - 2 - cond.shape[0]
        s_rows = min(rows.numel(), max(subset, _SCREEN_ELEMENTS // K))
        # S may share rows with a family's B: those vanish on the whole plane and have no angle (`line_angles`).
        perm = rows[torch.randperm(rows.numel(), generator=gen)]
        subset_idx = perm[:s_rows]
        family = self.act_rows[rows[distinct_draws(rows.numel(), K, d, gen)]]    # (K, b-2-f, b)
        if cond.shape[0]:
            family = torch.cat((family, cond.expand(K, -1, -1)), dim=1)
        y, ok = family_kernels(family)                                # repeated rows are exactly singular: dropped
        if not bool(ok.all()):
            y = y[ok]
        self.samples += y.shape[0]
        self.proposals += y.shape[0] * s_rows
        if y.shape[0] == 0:
            return
        p1, p2, chol = plane_coordinates(self.act_rows[subset_idx], y)
        flagged = torch.nonzero(flag_families(p1, p2, self.pair_tol)).flatten()
        if flagged.numel() == 0:
            return
        y, chol = y[flagged], chol[:, flagged]
        # Confirm on more rows before the full count: a column's run gains members there, a coincidence rarely.
        confirm = perm[: s_rows + _CONFIRM_ROWS]
        if confirm.numel() < rows.numel():
            p1, p2, _ = plane_coordinates(self.act_rows[confirm], y)
            flagged = torch.nonzero(flag_families(p1, p2, self.pair_tol, min_run=3)).flatten()
            if flagged.numel() == 0:
                return
            y, chol = y[flagged], chol[:, flagged]
        self.examine(rows, y, chol, cond)


def distinct_draws(r: int, K: int, d: int, gen: torch.Generator) -> Tensor:
    """K uniform random d-subsets of range(r) as a (K, d) index tensor, rows of distinct indices when cheap.

    Few rows (r small next to d^2) would repeat an index in many draws, each a wasted, singular solve: there a
    partial Fisher-Yates shuffle draws without replacement. Otherwise independent draws; the rare repeats give
    exactly singular submatrices that `family_kernels` drops.
    """
    if d * (d - 1) <= 0.1 * r or d == 0:
        return torch.randint(0, r, (K, d), generator=gen)
    perm = torch.arange(r).repeat(K, 1)
    rows = torch.arange(K)
    for i in range(d):
        j = i + (torch.rand(K, generator=gen) * (r - i)).long().clamp_max(r - i - 1)
        pi, pj = perm[rows, i].clone(), perm[rows, j]
        perm[rows, i] = pj
        perm[rows, j] = pi
    return perm[:, :d]


def lift(act_rows: Tensor, p: Tensor, cond: Tensor, cond_masks: Tensor, tol: float, min_run: int
         ) -> tuple[Tensor, Tensor]:
    """Undo the quotient of deflated families: find q_i = p + sum_k alpha_k q_k from its projection p.

    act_rows: (m', b) unit rows; p: (c, b) directions found; cond: (f, b) the conditioning directions q_k;
    cond_masks: (m', f) their zero sets. On rows in every zero set but q_k's, <l_j, q_i> = <l_j, p> + alpha_k
    <l_j, q_k>, which vanishes on the rows of zeros_i: there all rows give the same alpha_k, read off as the
    longest run of equal angles atan2(-<l_j, p>, <l_j, q_k>) (mod pi). Returns (c, b) unit directions and ok (c,).
    """
    f = cond.shape[0]
    out = p.clone()
    ok = torch.ones(p.shape[0], dtype=torch.bool)
    for k in range(f):
        others = torch.ones(f, dtype=torch.bool)
        others[k] = False
        rows = act_rows[cond_masks[:, others].all(dim=1) & ~cond_masks[:, k]]      # (r, b)
        if rows.shape[0] < 3:
            return out, torch.zeros_like(ok)
        a = rows @ out.T                                                             # (r, c)
        c = (rows @ cond[k])[:, None].expand_as(a)
        theta = torch.atan2(-a, c).remainder(math.pi)
        theta, _, gaps = sorted_gaps(theta)
        close = gaps < tol
        close[0] = False
        run_id = torch.cumsum(~close, dim=0) - 1
        lengths = torch.zeros(out.shape[0], theta.shape[0], dtype=torch.long)
        lengths.scatter_add_(1, run_id.T, torch.ones_like(run_id.T))
        best_len, best_run = lengths.max(dim=1)
        ok &= best_len >= min(min_run, 3)
        first = (run_id == best_run[None, :]).to(torch.long).argmax(dim=0)            # first row of the run
        phi = theta.gather(0, first[None, :])[0]
        # q ~ p + tan(phi) q_k, written without the tangent: cos(phi) p + sin(phi) q_k.
        out = torch.cos(phi)[:, None] * out + torch.sin(phi)[:, None] * cond[k][None, :]
    return out / out.norm(dim=1, keepdim=True), ok


def _parallel_to(q: Tensor, known: Tensor) -> Tensor:
    """(c,) bool: q (c, b) parallel (|cos| > 1 - _SAME) to some row of known (k, b)."""
    if known.shape[0] == 0 or q.shape[0] == 0:
        return torch.zeros(q.shape[0], dtype=torch.bool)
    return ((q @ known.T).abs() > 1 - _SAME).any(dim=1)


def _parallel_to_earlier(q: Tensor) -> Tensor:
    """(c,) bool: row i of q parallel to a row j < i."""
    if q.shape[0] < 2:
        return torch.zeros(q.shape[0], dtype=torch.bool)
    return torch.tril((q @ q.T).abs() > 1 - _SAME, diagonal=-1).any(dim=1)


# --- the dictionary search: sparsest directions of the span of L ---------------------------------------------------------

def direction_noise(problem: Problem, directions: Tensor) -> Tensor:
    """Standard deviation of the noise on <l_j, q> for each unit direction q (c, b): noise_std * ||S_b^-1 q||,
    never below the dtype floor of the zero test (see `zero_tolerance`). Returns (c,), absolute (raw rows of L)."""
    S = problem.singular_values
    floor = problem.floor * problem.row_rms
    return (problem.noise_std * (directions / S[None, :]).norm(dim=1)).clamp_min(floor / _ZERO_SIGMAS)


def sparse_directions(L: Tensor, starts: Tensor, problem: Problem, iters: int = 40) -> Tensor:
    """Local minimisers of ||L q||_1 over the unit sphere by iteratively reweighted least squares, from `starts`.

    L: (m', b) raw active rows; starts: (K, b) unit. Each column q_i of the disaggregation makes L q_i zero on about
    half of the rows (ReLU), so it is a sharp local minimum of the l1 norm over the sphere (dual principal component
    pursuit, Tsakiris & Vidal 2018; the l1 view of sparsely-used dictionary learning, Spielman, Wang & Wright 2012,
    that SPEAR++ takes). One IRLS step solves min sum_j w_j <l_j, q>^2 with w_j = 1 / max(|<l_j, q>|, delta): the
    smallest eigenvector of the weighted Gram matrix, for all K starts in one batched call. delta is the noise level
    of the direction, so under noise the minimiser averages the zero rows instead of chasing their noise.
    Returns (K, b) unit directions.
    """
    q = starts
    for _ in range(iters):
        delta = direction_noise(problem, q)
        w = 1.0 / (L @ q.T).abs().clamp_min(delta[None, :])                          # (m', K)
        gram = torch.einsum("jk,ja,jc->kac", w, L, L)
        _, vecs = torch.linalg.eigh(gram)
        new = vecs[:, :, 0]
        new = new * torch.where((new * q).sum(1) < 0, -1.0, 1.0)[:, None]
        moved = (new - q).norm(dim=1)
        q = new
        if bool((moved < 1e-12).all()):
            break
    return q


def noisy_zero_mask(problem: Problem, L: Tensor, directions: Tensor) -> Tensor:
    """(m', c) bool: |<l_j, q>| within `_ZERO_SIGMAS` noise standard deviations of zero (raw rows, per direction)."""
    return (L @ directions.T).abs() <= _ZERO_SIGMAS * direction_noise(problem, directions)[None, :]


@dataclass
class DictionarySearch:
    """Candidates as sparse directions of span(L) found by IRLS from random starts (see `sparse_directions`).

    Each round draws `starts` random unit directions, runs IRLS, refines the results on their zero rows, and adds
    those with at least `min_zeros` zeros to the pool (masks, counts and de-duplication as the sampling search).
    `samples` counts starts: the budget `max_samples` is spent one start at a time here.
    """

    problem: Problem
    L: Tensor
    pool: Tensor
    m: int
    min_zeros: int
    cands: Candidates
    samples: int = 0
    proposals: int = 0

    def round(self, starts: int, gen: torch.Generator) -> None:
        b = self.L.shape[1]
        q0 = torch.randn(starts, b, generator=gen, dtype=_F64)
        q0 = q0 / q0.norm(dim=1, keepdim=True)
        q = sparse_directions(self.L, q0, self.problem)
        self.samples += starts
        self.proposals += starts
        for _ in range(2):
            q = refine(self.L, q, noisy_zero_mask(self.problem, self.L, q))  # raw rows: equal noise on each
        zeros = noisy_zero_mask(self.problem, self.L, q)
        counts = zeros.sum(0)
        keep = counts >= self.min_zeros
        q, zeros, counts = q[keep], zeros[:, keep], counts[keep]
        # One representative per direction: the same column reached from many starts differs by noise only.
        order = torch.argsort(counts, descending=True, stable=True)
        q, zeros, counts = q[order], zeros[:, order], counts[order]
        first = ~torch.tril(_same_zeros(zeros, zeros), diagonal=-1).any(dim=1)
        q, zeros, counts = q[first], zeros[:, first], counts[first]
        if len(self.cands) and q.shape[0]:
            fresh = ~_same_zeros(zeros, self.cands.masks[self.pool]).any(dim=1)
            q, zeros, counts = q[fresh], zeros[:, fresh], counts[fresh]
        if q.shape[0]:
            masks = torch.ones(self.m, q.shape[0], dtype=torch.bool)
            masks[self.pool] = zeros
            self.cands.add(q, counts, masks)


def _same_zeros(a: Tensor, b: Tensor) -> Tensor:
    """(c, k) bool: zero sets a (m', c) and b (m', k) that agree on more than 90% of their union (one column)."""
    inter = a.to(_F64).T @ b.to(_F64)
    union = a.sum(0)[:, None] + b.sum(0)[None, :] - inter
    return (inter / union.clamp_min(1)) > 0.9


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
) -> SpearResult:
    """SPEAR on one Linear layer followed by ReLU. Shapes as torch.nn.Linear:

    weight: (m, n), bias: (m,), grad_weight: (m, n), grad_bias: (m,), any float dtype (float64 inside).
    batch_size: b (distinct samples in the update), or None to estimate it as the numerical rank of grad_weight.
    max_samples: the search budget, counted (deterministic): sampled (b-2)-row families for the sampling solver,
    IRLS starts for the dictionary solver. max_seconds: a wall-clock safety net only (None: none); when it stops
    the search the result says so (`stop_reason` "seconds", `budget_exhausted`), since then the answer depends on
    the machine's speed.
    tau: a direction is a candidate when L q is zero on at least tau x m' rows (m' = active rows).
    tol: relative zero tolerance (None: from the gradient's own noise level, see `zero_tolerance`).
    subset: rows on which each family's proposals are screened before a full count; chunk: families per batch.
    deflate: condition later families on directions already found (see `Search.sample`); False samples exactly
    as the paper does.
    solver: "sampling" (SPEAR's search), "dictionary" (sparse directions by IRLS, `DictionarySearch`), or "auto":
    sampling on exact gradients up to b = 24, dictionary when the gradient is noisy (noise above float32 rounding)
    or the batch larger.
    weight_after, bias_after: the layer after the client's local training (FedAvg with several steps): the ReLU
    pattern of each sample was set somewhere between the two, so the certificate judges only the entries whose
    sign agrees at both ends.
    seed: seeds the sketch and the search (the result is deterministic given the inputs and the seed).

    Stops as soon as a certified reconstruction exists; on a noisy gradient, once further search stops changing
    the selection; otherwise at the budget. Never raises on a finite gradient of a valid shape: without an exact
    answer it returns the most consistent one it found, `certified=False`, with per-sample error estimates. Raises
    `AttackNotApplicable` without a bias, on a non-finite gradient, or when b >= min(m, n).

    Runs on one intra-op thread: its batched small solves gain nothing from more (measured), and the result is then
    the same bit for bit on every machine, whatever its core count.
    """
    if solver not in ("auto", "sampling", "dictionary"):
        raise ValueError(f"solver must be one of auto, sampling, dictionary; got {solver!r}")
    with single_thread():
        return _reconstruct(weight, bias, grad_weight, grad_bias, batch_size, max_samples=max_samples,
                            max_seconds=max_seconds, tau=tau, tol=tol, subset=subset, chunk=chunk, deflate=deflate,
                            solver=solver, weight_after=weight_after, bias_after=bias_after, seed=seed)


def _reconstruct(weight: Tensor, bias: Tensor | None, grad_weight: Tensor, grad_bias: Tensor | None,
                 batch_size: int | None, *, max_samples: int, max_seconds: float | None, tau: float,
                 tol: float | None, subset: int, chunk: int, deflate: bool, solver: str,
                 weight_after: Tensor | None, bias_after: Tensor | None, seed: int) -> SpearResult:
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
    # in the noise: no search can find all columns, so none is run beyond a short look.
    edge = problem.noise_std * (math.sqrt(max(m - b, 1)) + math.sqrt(max(n - b, 1)))
    lost = noisy and float(problem.singular_values[-1]) <= _NOISE_FLOOR * edge
    # Mild noise (a FedAvg delta's float32 cancellation, SecAgg+'s quantisation): the sampling search still finds
    # the columns at the tolerance it was tuned with (capped at 1e-3); heavier noise needs the dictionary solver.
    mild = noisy and problem.tol <= _SAMPLING_MAX_TOL
    use_dictionary = solver == "dictionary" or (solver == "auto" and ((noisy and not mild) or b > _SAMPLING_MAX_B))
    if not (use_dictionary or lost):
        problem = replace(problem, tol=max(problem.sampling_tol, problem.tol) if mild else problem.sampling_tol)
    tol_zero = problem.tol
    min_zeros = max(b - 1, math.ceil(tau * m_act))
    cands = Candidates.empty(m, b)
    if use_dictionary or lost:
        search = DictionarySearch(problem=problem, L=problem.L[pool], pool=pool, m=m, min_zeros=min_zeros,
                                  cands=cands)
    else:
        search = Search(
            act_rows=problem.unit_rows[pool], pool=pool, m=m, min_zeros=min_zeros,
            min_run=max(4, math.ceil(0.01 * m_act)), tol=tol_zero, pair_tol=min(1e-2, 10.0 * tol_zero),
            count_tol=min(1e-2, 10.0 * tol_zero), cands=cands)

    best: Selection | None = None
    stop_reason = "samples"

    improved_at, first_full = 0, None

    def attempt(swaps: int) -> bool:
        nonlocal best, improved_at, first_full
        found = select(problem, search.cands, b, swaps)
        if found is not None and (best is None or found.consistency.mismatches < best.consistency.mismatches):
            best, improved_at = found, search.samples
            first_full = search.samples if first_full is None else first_full
        if best is None or best.consistency.mismatches != 0:
            return False
        if not noisy:
            return True
        return bool((_CERT_SAFETY * sample_errors(problem, best.Q, _solve_inputs(best.Q, fact.R)) <= _EXACT).all())

    def out_of_time() -> bool:
        return max_seconds is not None and time.perf_counter() - start > max_seconds

    if b == 1:
        search.cands.add(torch.ones(1, 1, dtype=_F64), (~active).sum().view(1), (~active)[:, None].clone())
        stop_reason = "solved"
    elif lost:
        search.round(min(max_samples, 4 * b), gen)
        stop_reason = "noise"
    elif isinstance(search, DictionarySearch):
        # Rounds of IRLS starts until the selection is certified, or (noisy gradient) until a round adds nothing
        # that changes it: further starts then only find the same columns again.
        starts, stable = max(64, 4 * b), 0
        while search.samples < max_samples:
            if out_of_time():
                stop_reason = "seconds"
                break
            before = (search.cands.version, None if best is None else best.indices)
            search.round(min(starts, max_samples - search.samples), gen)
            if len(search.cands) >= b and attempt(swaps=4):
                stop_reason = "certified"
                break
            after = (search.cands.version, None if best is None else best.indices)
            stable = stable + 1 if (best is not None and after[1] == before[1]) else 0
            if noisy and best is not None and stable >= 2:
                stop_reason = "converged"
                break
    elif b == 2:
        search.screen_plane()
        stop_reason = "solved"
    elif pool.numel() - (b - 2) >= 2:
        size, tried, next_swaps, batches = 64, -1, 0, 0
        # A batch the sampling search has not solved by then gets IRLS rounds into the same candidate pool too
        # (a different route to the same columns), on a doubling schedule counted in samples.
        helper = DictionarySearch(problem=problem, L=problem.L[pool], pool=pool, m=m, min_zeros=min_zeros,
                                  cands=search.cands)
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
            # Noisy: no certificate may ever come; stop once a long stretch of samples improved nothing.
            if noisy and first_full is not None and search.samples - improved_at >= max(3 * first_full, 100_000):
                stop_reason = "converged"
                break
    if len(search.cands) >= b and not (best is not None and best.consistency.mismatches == 0):
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
    exhausted = not certified and stop_reason in ("samples", "seconds")
    return SpearResult(
        inputs=inputs, grad_out=problem.L @ Q, certified=bool(certified), samples=search.samples,
        proposals=search.proposals, candidates=len(search.cands), seconds=time.perf_counter() - start,
        batch_size=b, batch_size_estimated=None if batch_size is not None else rank, rank=rank, tol=tol_zero,
        mismatches=cons.mismatches, fit_residual=problem.fit_residual, bias_residual=cons.bias_residual,
        stage=stage, noise_std=problem.noise_std, sample_errors=errors, budget_exhausted=exhausted,
        stop_reason=stop_reason, solver="dictionary" if isinstance(search, DictionarySearch) else "sampling",
        noise_limited=lost)


def _solve_inputs(Q: Tensor, R: Tensor) -> Tensor:
    """X^T = Q^-1 R, by least squares where Q is singular to working precision (never raises)."""
    X, info = torch.linalg.solve_ex(Q, R)
    if int(info) == 0 and bool(torch.isfinite(X).all()):
        return X
    return torch.linalg.pinv(Q) @ R


def sample_errors(problem: Problem, Q: Tensor, inputs: Tensor) -> Tensor:
    """First-order estimate of each returned sample's relative error ||x_hat_i - x_i|| / ||x_i||. Returns (b,).

    Each column q_i is the least-squares kernel of its zero rows Z_i; noise of standard deviation s_i on those rows
    (`direction_noise`) tilts it by about s_i sqrt(sum_{k>=2} 1/lambda_k(L_Z^T L_Z)). The smallest of those
    eigenvalues is what pins q_i down: when two samples are near-duplicates, the rows that tell their columns apart
    are few, lambda_2 is small and the estimate grows (a direction between the two is then as consistent as either).
    A zero set with a second null direction (lambda_2 ~ 0) gives an infinite estimate. The tilts reach x_i through
    X^T = Q^-1 R (dX^T = -Q^-1 dQ X^T); the noise of R itself (noise_std per entry) through the row of Q^-1.
    """
    b = Q.shape[1]
    norms = Q.norm(dim=0).clamp_min(1e-300)
    qbar = (Q / norms).T                                                           # (b, b) unit columns as rows
    active = problem.row_norm > 0
    L = problem.L[active]
    zeros = noisy_zero_mask(problem, L, qbar)   # the noise's own threshold: a wide search tolerance would add rows
    sigma = problem.noise_std * (qbar / problem.singular_values[None, :]).norm(dim=1)
    gram = torch.einsum("jc,ja,jd->cad", zeros.to(_F64), L, L)
    lam = torch.linalg.eigvalsh(gram)                                              # (b, b) ascending
    if b > 1:
        tilt = sigma * (1.0 / lam[:, 1:].clamp_min(1e-300)).sum(1).sqrt()
    else:
        tilt = torch.zeros(1, dtype=_F64)
    Qinv = torch.linalg.pinv(Q)
    x_norm = inputs.norm(dim=1).clamp_min(1e-300)
    # dx_i = -sum_l (Q^-1 dq_l)_i x_l with ||dq_l|| = tilt_l ||q_l||: root-sum-square over l (independent tilts).
    spread = (Qinv.abs() * (tilt * norms)[None, :]) * x_norm[None, :]                 # (b, b)
    from_dirs = spread.pow(2).sum(1).sqrt()
    n = problem.R.shape[1]
    from_R = Qinv.norm(dim=1) * problem.noise_std * math.sqrt(n)
    err = (from_dirs + from_R) / x_norm
    return torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))


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
    W, bias64 = weight.detach().to(_F64), bias.detach().to(_F64)
    dW, db = grad_weight.detach().to(_F64), grad_bias.detach().to(_F64)
    if not (torch.isfinite(dW).all() and torch.isfinite(db).all()):
        raise AttackNotApplicable("spear needs a finite gradient (the update holds NaN or inf)")
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
    fit_res = float((dW - L @ fact.R).norm() / dW.norm().clamp_min(1e-300))
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
        floor=floor,
        WR_after=None if weight_after is None else weight_after.detach().to(_F64) @ fact.R.T,
        bias_after=None if weight_after is None else (bias64 if bias_after is None else bias_after.detach().to(_F64)),
        move_norm=None if weight_after is None else (weight_after.detach().to(_F64) - W).norm(dim=1),
        move_bias=None if weight_after is None else (
            (bias_after.detach().to(_F64) - bias64).abs() if bias_after is not None else torch.zeros_like(bias64)))
    return problem, fact, rank


# --- the attack -------------------------------------------------------------------------------------------------------

_PASS_THROUGH = (nn.Flatten, nn.Identity, nn.Dropout)


def first_linear_relu(model: nn.Module) -> tuple[str, nn.Linear]:
    """The layer SPEAR attacks: the model's first parametrised layer, which must be nn.Linear followed by ReLU.

    Returns (parameter-name prefix, layer), e.g. ("net.1", Linear): its gradients are `prefix + ".weight"` and
    `prefix + ".bias"`. The order is the execution order from torch.fx when the model traces, else the modules'
    registration order (which is the execution order of nn.Sequential stacks). Only Flatten/Identity/Dropout (or a
    flatten/reshape/view) may come before the layer. Raises AttackNotApplicable, one line, otherwise.
    """
    try:
        order = _traced_leaves(torch.fx.symbolic_trace(model))
    except Exception:  # noqa: BLE001 - any tracing failure falls back to the registration order
        order = [(name, mod) for name, mod in model.named_modules() if not list(mod.children())]
    for pos, (name, mod) in enumerate(order):
        if mod is None or not list(mod.parameters(recurse=False)):
            if mod is None or isinstance(mod, _PASS_THROUGH):
                continue
            raise AttackNotApplicable(f"spear attacks the first layer, but {type(mod).__name__} ('{name}') comes "
                                      "before any Linear layer")
        if not isinstance(mod, nn.Linear):
            raise AttackNotApplicable(f"spear needs the first parametrised layer to be Linear followed by ReLU, "
                                      f"got {type(mod).__name__} ('{name}')")
        after = next((m for _, m in order[pos + 1:] if not isinstance(m, (nn.Identity, nn.Dropout))), None)
        if not (isinstance(after, nn.ReLU) or after is _RELU):
            got = "nothing" if after is None else "a function" if not isinstance(after, nn.Module) else type(after).__name__
            raise AttackNotApplicable(f"spear needs ReLU right after the first Linear layer ('{name}'), got {got}")
        if mod.bias is None:
            raise AttackNotApplicable(f"spear needs a bias on the first Linear layer ('{name}'): without it the "
                                      "samples' scales are not identifiable")
        return name, mod
    raise AttackNotApplicable("spear found no parametrised layer in the model")


_RELU = object()  # marks a functional relu (F.relu, torch.relu, x.relu()) in a traced graph
_SHAPE_OPS = {"flatten", "reshape", "view", "contiguous"}


def _traced_leaves(graph_module) -> list[tuple[str, object]]:
    """(name, module) in execution order; functional relu as `_RELU`, shape ops as None, other functions raise."""
    modules = dict(graph_module.named_modules())
    out: list[tuple[str, object]] = []
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            out.append((str(node.target), modules[node.target]))
        elif node.op in ("call_function", "call_method"):
            fname = getattr(node.target, "__name__", str(node.target))
            if node.target in (F.relu, torch.relu) or fname == "relu":
                out.append((fname, _RELU))
            elif fname in _SHAPE_OPS or node.target is torch.flatten:
                out.append((fname, None))
            else:
                raise AttackNotApplicable(f"spear attacks the first layer, but the model computes {fname} "
                                          "before it")
        elif node.op == "get_attr":
            raise AttackNotApplicable(f"spear needs the first parametrised layer to be nn.Linear, the model uses "
                                      f"parameter '{node.target}' directly")
    return out


@register_attack("spear")
class Spear(Attack):
    """SPEAR (Dimitrov et al. 2024): exact reconstruction of a batch from the gradient of a Linear+ReLU layer."""

    name = "spear"

    @dataclass(frozen=True)
    class Config:
        max_samples: int = knob(20_000_000, ge=1, help="budget of sampled (b-2)-row submatrices per observation")
        max_seconds: float | None = knob(300.0, gt=0, help="wall-clock budget per observation (null: none)")
        tau: float = knob(0.1, gt=0, lt=1, help="sparsity filter: a direction needs >= tau x active rows zeros")
        tol: float | None = knob(None, gt=0, lt=1, help="relative zero tolerance (null: from the gradient's rank-b residual)")
        subset: int = knob(12, ge=2, help="rows on which proposals are screened before a full count")
        chunk: int = knob(4096, ge=16, help="submatrices factorised per batched solve")
        deflate: bool = knob(True, help="condition later samples on found columns; false: the paper's uniform sampling")
        batch_size: str = knob("meta", choices=("meta", "estimate"),
                               help="b from the threat model (meta.batch_size; estimated when not granted) or always estimated")
        solver: str = knob("auto", choices=("auto", "sampling", "dictionary"),
                           help="search: SPEAR's sampling, sparse directions by IRLS, or auto (dictionary on noisy updates or b > 24)")
        seed: int = knob(0, help="seed of the sketch and of the sampling")

    def check(self, model: nn.Module, meta: TrainMeta) -> None:
        super().check(model, meta)
        _, layer = first_linear_relu(model)
        m, n = layer.weight.shape
        b = meta.batch_size if self.config.batch_size == "meta" else None
        if b is not None and b >= min(m, n):
            raise AttackNotApplicable(f"spear needs batch size b < min(m, n) = {min(m, n)} for the first layer "
                                      f"({m}x{n}), the threat model grants b={b}")

    def reconstruct(self, obs: Observation) -> Reconstruction:
        prefix, layer = first_linear_relu(obs.model)
        grads = obs.gradient()
        cfg = self.config
        b = distinct_samples(obs.meta) if cfg.batch_size == "meta" else None
        after: dict[str, Tensor] = {}
        if obs.meta.mode == "fedavg" and (obs.meta.local_steps or 1) > 1:
            # The weights moved during local training: the certificate judges signs that agree at both ends.
            after = {k: getattr(layer, k).detach() + obs.update[f"{prefix}.{k}"] for k in ("weight", "bias")}
        result = reconstruct(
            layer.weight, layer.bias, grads[f"{prefix}.weight"], grads[f"{prefix}.bias"], b,
            max_samples=cfg.max_samples, max_seconds=cfg.max_seconds, tau=cfg.tau, tol=cfg.tol,
            subset=cfg.subset, chunk=cfg.chunk, deflate=cfg.deflate, solver=cfg.solver,
            weight_after=after.get("weight"), bias_after=after.get("bias"), seed=cfg.seed)
        inputs = result.inputs.reshape(result.batch_size, *obs.meta.input_shape).to(layer.weight.dtype)
        errors = result.sample_errors
        stats: dict[str, float | int | bool | str] = {
            "samples": result.samples, "proposals": result.proposals, "candidates": result.candidates,
            "seconds": round(result.seconds, 4), "batch_size": result.batch_size, "rank": result.rank,
            "mismatches": result.mismatches, "tol": result.tol, "fit_residual": result.fit_residual,
            "stage": result.stage, "solver": result.solver, "stop_reason": result.stop_reason,
            "budget_exhausted": result.budget_exhausted, "noise_std": result.noise_std,
            "noise_limited": result.noise_limited,
            "sample_error_max": float(errors.max()) if errors is not None else math.nan,
            "samples_pinned": int((_CERT_SAFETY * errors <= _EXACT).sum()) if errors is not None else 0}
        if result.batch_size_estimated is not None:
            stats["batch_size_estimated"] = result.batch_size_estimated
        return Reconstruction(inputs=inputs, certified=result.certified, matching_loss=result.fit_residual,
                              stats=stats)


def distinct_samples(meta: TrainMeta) -> int | None:
    """The rank the update really has: the distinct samples it was computed on (None when b is not granted).

    FedSGD: one batch, at most the client's examples. FedAvg with T local steps of batch B: the update is
    sum_t G_t X_t^T, of rank min(T B, examples) (batches without replacement, a new epoch reshuffles the same
    samples), with the inputs as its right factor whatever the steps (only the ReLU patterns move with W).
    """
    if meta.mode == "fedavg" and meta.distinct_samples is not None:  # the threat model counted them (epochs)
        return meta.distinct_samples
    if meta.batch_size is None:
        return None
    steps = 1 if meta.mode == "fedsgd" else (meta.local_steps or 1)
    b = meta.batch_size * steps
    if meta.num_examples is not None:
        b = min(b, meta.num_examples)
    return b
