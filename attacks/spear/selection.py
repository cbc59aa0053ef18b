"""SPEAR steps 4-6 for every solver: the candidate pool, greedy selection with swaps, scales and signs from the
bias gradient, the certificate and the per-sample error estimates."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedsim.attacks.spear.factorisation import _F64, _ZERO_SIGMAS, Consistency, Problem, noisy_zero_mask


_ALL_POSITIONS = 24   # up to this b, stage 2 tries every position (the sampling search's tuned behaviour)
_SWAP_POSITIONS = 8   # above it, this many of the positions with violations,
_SWAP_OTHERS = 16     # each swapped with one of this many best-ranked unused candidates


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
    forced_rows: int = -1   # rows a proposal may force to zero beyond the intersection (-1: b - 1, see `prune`)
    version: int = 0
    excluded: Tensor | None = None  # (c,) set aside for good (`exclude`): ranked with the dominated ones
    scores: Tensor | None = None    # (c,) noisy gradients: share of sign contradictions (`pattern_scores`), lower first

    @classmethod
    def empty(cls, m: int, b: int, forced_rows: int = -1, device: torch.device | str = "cpu") -> "Candidates":
        return cls(torch.empty(0, b, dtype=_F64, device=device), torch.empty(0, dtype=torch.long, device=device),
                   torch.empty(m, 0, dtype=torch.bool, device=device), torch.empty(0, dtype=torch.bool, device=device),
                   keep_dominated=2 * b, forced_rows=forced_rows)

    def __len__(self) -> int:
        return self.directions.shape[0]

    def add(self, directions: Tensor, counts: Tensor, masks: Tensor, scores: Tensor | None = None) -> None:
        """Add directions; `scores` (one per direction) must be given on every add or on none."""
        if directions.shape[0] == 0:
            return
        if (scores is None) != (self.scores is None) and len(self):
            raise ValueError("candidates are either all scored or none is")
        before = self.directions
        self.directions = torch.cat((self.directions, directions))
        self.counts = torch.cat((self.counts, counts))
        self.masks = torch.cat((self.masks, masks), dim=1)
        if scores is not None:
            self.scores = scores.to(_F64) if self.scores is None else torch.cat((self.scores, scores.to(_F64)))
        fresh = torch.zeros(directions.shape[0], dtype=torch.bool, device=directions.device)
        self.excluded = fresh if self.excluded is None else torch.cat((self.excluded, fresh))
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
        slack = self._forced() + 0.01 * sizes
        dominated = ((sizes[:, None] - inside) <= slack[:, None]) & (sizes[None, :] > sizes[:, None])
        self.dominated = dominated.any(dim=1) | self.excluded
        order = torch.argsort(self.counts, descending=True, stable=True)
        rank_in_dominated = torch.cumsum(self.dominated[order].long(), 0)
        keep = torch.ones(len(self), dtype=torch.bool, device=self.counts.device)
        keep[order] = ~self.dominated[order] | (rank_in_dominated <= self.keep_dominated)
        if not bool(keep.all()):
            self.directions, self.counts = self.directions[keep], self.counts[keep]
            self.masks, self.dominated = self.masks[:, keep], self.dominated[keep]
            self.excluded = self.excluded[keep]
            if self.scores is not None:
                self.scores = self.scores[keep]

    def exclude(self, indices: list[int]) -> None:
        """Set candidates aside for good (a zero pattern no single input explains, see `sign_violations`)."""
        if indices:
            self.excluded[indices] = True
            self.dominated[indices] = True
            self.version += 1

    def _forced(self) -> int:
        return self.directions.shape[1] - 1 if self.forced_rows < 0 else self.forced_rows

    def dominance(self, masks: Tensor, rows: Tensor) -> tuple[Tensor, int]:
        """For new zero patterns masks: (r, c) on `rows`: which lie inside a known candidate's (as in `prune`), and
        the zero count a dominated direction must exceed to enter the pool (-1 while the pool has room)."""
        if len(self) == 0:
            return torch.zeros(masks.shape[1], dtype=torch.bool, device=masks.device), -1
        known = self.masks[rows].to(_F64)
        new = masks.to(_F64)
        inside = new.T @ known                                          # (c, k)
        sizes, known_sizes = new.sum(0), known.sum(0)
        slack = self._forced() + 0.01 * sizes
        dominated = ((sizes[:, None] - inside) <= slack[:, None]) & (known_sizes[None, :] > sizes[:, None])
        kept = self.counts[self.dominated]
        floor = int(kept.sort(descending=True).values[self.keep_dominated - 1]) if kept.numel() >= self.keep_dominated else -1
        return dominated.any(dim=1), floor

    def order(self) -> list[int]:
        """Stage-1 order: directions not dominated first, each group sparsest first; scored pools (noisy gradients)
        by fewest sign contradictions first, sparsest first among equals."""
        key = self.dominated.to(torch.long) * (1 << 40) - self.counts
        if self.scores is None:
            return torch.argsort(key, stable=True).tolist()
        by_count = torch.argsort(-self.counts, stable=True)
        key = self.dominated.to(_F64) * 2.0 + self.scores        # scores lie in [0, 1]
        return by_count[torch.argsort(key[by_count], stable=True)].tolist()

# --- steps 4-6: selection, scales, certificate -------------------------------------------------------------------------

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


def certify(problem: Problem, Q: Tensor, per_column: bool = False) -> tuple[Tensor, Tensor]:
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
    nonzero: Tensor | float = problem.tol
    if problem.noise_std > 0 and problem.singular_values is not None:
        # A row of small norm carries the same absolute noise as any other (see `zero_tolerance`): its relative
        # value can exceed tol on a true zero. An entry within the noise (|<l_j, q>| <= _ZERO_SIGMAS sigma) is left
        # undecided: above tol/30 it is not a zero, and it counts as non-zero only above the noise as well.
        sigma = problem.noise_std * (qbar / problem.singular_values[None, :, None]).norm(dim=1)        # (P, b)
        row_inv = 1.0 / problem.row_norm.clamp_min(1e-300)
        nonzero = ((_ZERO_SIGMAS * sigma)[:, None, :] * row_inv[None, :, None]).clamp_min_(problem.tol)
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
    wrong = ((dots <= problem.tol / 30) & positive) | ((dots > nonzero) & negative)
    bias_res = (Q.sum(2) @ problem.L.T - problem.grad_bias).norm(dim=1)
    violations = wrong.sum(dim=1) if per_column else wrong.sum(dim=(1, 2))   # (P, b) per sample, or (P,)
    return violations, bias_res / problem.grad_bias.norm().clamp_min(1e-300)


def score(problem: Problem, cands: Candidates, sels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Certificates of selections sels: (P, b) indices into `cands`.

    Returns violations (P,) (a huge number where the selection cannot be inverted), bias residuals (P,), Q (P, b, b).
    """
    Q, ok = disaggregate(problem, cands.directions[sels].mT)
    Q = torch.where(ok[:, None, None], Q, torch.eye(Q.shape[1], dtype=_F64, device=Q.device))
    mismatches, bias_res = certify(problem, Q)
    return torch.where(ok, mismatches, torch.iinfo(torch.long).max), bias_res, Q


def independent_greedy(directions: Tensor, order: list[int], b: int, tol: float) -> list[int]:
    """Stage 1: walk candidates in `order`, keep those linearly independent of the kept ones (up to b)."""
    basis = torch.empty(directions.shape[1], 0, dtype=_F64, device=directions.device)
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
    Above `_ALL_POSITIONS` columns only the positions whose samples show violations are swapped (at most
    `_SWAP_POSITIONS`, worst first) with the `_SWAP_OTHERS` best-ranked unused candidates: a wrong column corrupts
    the samples it mixes, so its position is among them, and b x 2b certificates per round cost minutes at b = 64.
    """
    order = cands.order()
    sel = independent_greedy(cands.directions, order, b, min(0.1, max(1e-6, 100 * problem.tol)))
    if len(sel) < b:
        return None
    device = cands.directions.device
    mism, bias_res, Q = score(problem, cands, torch.tensor([sel], device=device))
    if int(mism[0]) == torch.iinfo(torch.long).max:
        return None
    best = Selection(sel, Consistency(int(mism[0]), float(bias_res[0])), Q[0], 1)
    for _ in range(swaps):
        others = [i for i in order if i not in best.indices][: 2 * b if b <= _ALL_POSITIONS else _SWAP_OTHERS]
        if best.consistency.mismatches == 0 or not others:
            break
        base = torch.tensor(best.indices, device=device)
        positions = torch.arange(b, device=device)
        if b > _ALL_POSITIONS:
            per_sample, _ = certify(problem, best.Q[None], per_column=True)
            worst = torch.argsort(per_sample[0], descending=True, stable=True)
            positions = worst[per_sample[0][worst] > 0][:_SWAP_POSITIONS]
        trials = base.repeat(len(positions) * len(others), 1)
        pos = positions.repeat_interleave(len(others))
        trials[torch.arange(trials.shape[0], device=device), pos] = torch.tensor(others, device=device).repeat(len(positions))
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
        basis = torch.stack(cols, dim=1) if cols else torch.empty(b, 0, dtype=_F64, device=problem.L.device)
        r = torch.randn(b, generator=gen, dtype=_F64, device="cpu").to(problem.L.device)
        r = r - basis @ (basis.T @ r)
        if float(r.norm()) > 1e-6:
            cols.append(r / r.norm())
    directions = torch.stack(cols, dim=1)
    Q, ok = disaggregate(problem, directions[None])
    return Q[0] if bool(ok[0]) else directions


def _solve_inputs(Q: Tensor, R: Tensor) -> Tensor:
    """X^T = Q^-1 R, by least squares where Q is singular to working precision (never raises)."""
    X, info = torch.linalg.solve_ex(Q, R)
    if int(info) == 0 and bool(torch.isfinite(X).all()):
        return X
    return torch.linalg.pinv(Q) @ R


def sample_errors(problem: Problem, Q: Tensor, inputs: Tensor) -> Tensor:
    """First-order estimate of each returned sample's relative error ||x_hat_i - x_i|| / ||x_i||. Returns (b,).

    Each column q_i is the least-squares kernel of its zero rows Z_i; noise on those rows (`direction_noise`) tilts
    it within the complement of q_i, through the pseudo-inverse of L_Z^T L_Z there. The smallest of its eigenvalues
    is what pins q_i down: when two samples are near-duplicates, the rows that tell their columns apart are few,
    lambda_2 is small and the estimate grows (a direction between the two is then as consistent as either). A zero
    set with a second null direction (lambda_2 ~ 0) gives an infinite estimate. The tilts reach x_i through
    X^T = Q^-1 R (dX^T = -Q^-1 dQ X^T); the noise of R itself through the row of Q^-1 L^T.
    Noise is taken row by row (`Problem.row_noise`, the rank-b residual of each row): float32 rounding is larger on
    the rows where large samples are active, and a sample with a small gradient column (one the model already fits)
    is read through exactly those rows; with one average level its error was estimated 170x too small (a 1.2% error
    certified, `tests/test_spear.py::test_a_well_fitted_sample_is_recovered_and_certified`).
    """
    b = Q.shape[1]
    norms = Q.norm(dim=0).clamp_min(1e-300)
    qbar = (Q / norms).T                                                           # (b, b) unit columns as rows
    active = problem.row_norm > 0
    L = problem.L[active]
    if problem.row_noise is not None:
        row_var = problem.row_noise.pow(2)
    else:
        row_var = torch.full((problem.L.shape[0],), problem.noise_std ** 2, dtype=_F64, device=problem.L.device)
    zeros = noisy_zero_mask(problem, L, qbar)   # the noise's own threshold: a wide search tolerance would add rows
    # A zero row pins a column only where the recovered sample confirms it: its pre-activation clearly negative
    # (outside the certificate's band). Two near-duplicate samples whose ReLU patterns differ on one row are told
    # apart by that row alone, and their midpoint sits on it (Z ~ 0): without it the column is not pinned
    # (lambda_2 ~ 0, an infinite estimate) instead of certified half-way between them.
    Qinv_all = torch.linalg.pinv(Q)
    x_norm_all = (Qinv_all @ problem.R).norm(dim=1)
    pre = problem.WR[active] @ Qinv_all.T + problem.bias[active, None]              # (m', b)
    band = problem.tol * (problem.W_norm[active, None] * x_norm_all[None, :] + problem.bias[active].abs()[:, None])
    confirmed = pre < -band
    if problem.WR_after is not None:
        confirmed &= problem.WR_after[active] @ Qinv_all.T + problem.bias_after[active, None] < -band
    zeros = zeros & confirmed
    scale = (qbar / problem.singular_values[None, :]).norm(dim=1)                  # (b,) per unit of row noise
    if b > 1:
        gram = torch.einsum("jc,ja,jd->cad", zeros.to(_F64), L, L)
        lam, vecs = torch.linalg.eigh(gram)                                        # ascending; vecs (b, b, b)
        inv = 1.0 / lam[:, 1:].clamp_min(1e-300)                                   # (b, b-1)
        # E||dq_c||^2 = scale_c^2 sum_{j in Z_c} var_j sum_{k>=2} (v_ck . l_j)^2 / lambda_ck^2
        proj = torch.einsum("ja,cak->cjk", L, vecs[:, :, 1:])                      # (b, m', b-1)
        reach = (proj.pow(2) * inv[:, None, :].pow(2)).sum(2)                      # (b, m')
        tilt = scale * (reach * zeros.T.to(_F64) * row_var[active][None, :]).sum(1).sqrt()
        # A column that is not the least-squares kernel of its zero rows under this noise (a search's proposal
        # refined in a wider band) fits those rows worse than the noise model says: its tilt is as much larger.
        z = zeros.to(_F64)
        count = z.sum(0).clamp_min(1.0)
        fitted = ((L @ qbar.T).pow(2) * z).sum(0).div(count).sqrt()                # (b,) rms of <l_j, q> on Z_c
        expected = scale * ((z * row_var[active][:, None]).sum(0) / count).sqrt()
        tilt = tilt * torch.maximum(fitted / expected.clamp_min(1e-300), torch.ones_like(tilt))
    else:
        tilt = torch.zeros(1, dtype=_F64, device=problem.L.device)
    Qinv = torch.linalg.pinv(Q)
    x_norm = inputs.norm(dim=1).clamp_min(1e-300)
    # dx_i = -sum_l (Q^-1 dq_l)_i x_l with ||dq_l|| = tilt_l ||q_l||: root-sum-square over l (independent tilts).
    spread = (Qinv.abs() * (tilt * norms)[None, :]) * x_norm[None, :]                 # (b, b)
    from_dirs = spread.pow(2).sum(1).sqrt()
    n = problem.R.shape[1]
    from_R = ((Qinv @ problem.L.T).pow(2) @ row_var).sqrt() * math.sqrt(n)
    # The scales s = Q-bar^-1 L^T dbias (`disaggregate`): noise on L^T dbias moves s_i by bias_noise ||(Q-bar^-1)_i||,
    # and x_i by the same fraction; (Q-bar^-1)_i = |s_i| (Q^-1)_i, so the relative error is bias_noise ||(Q^-1)_i||.
    from_scale = problem.bias_noise * Qinv.norm(dim=1)
    err = (from_dirs + from_R) / x_norm + from_scale
    return torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))


