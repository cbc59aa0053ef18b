"""The large-batch solver (see the package docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import linprog
from torch import Tensor

from fedsim.attacks.spear.factorisation import _F64, Problem, direction_noise, noisy_zero_mask, refine
from fedsim.attacks.spear.sampling import plane_runs
from fedsim.attacks.spear.selection import Candidates, independent_greedy


_CHECK_PATTERNS_ABOVE = 24  # b above which each candidate's zero pattern is checked against one input
_CLUSTER_OVERLAP = 0.85  # zero sets sharing more than this of the smaller one: near-duplicate samples
_ROBUST_SHARE = 8  # one proposed point in this many also proposes a robust kernel (`robust_kernels`) ...
_ROBUST_ROWS = 4   # ... of its deepest _ROBUST_ROWS x b rows
_CLEAR_ZERO = 1.0    # noisy gradients: |<l_j, q>| within this many noise standard deviations is clearly zero ...
_CLEAR_ACTIVE = 8.0  # ... and beyond this many clearly non-zero (`pattern_scores`)


# --- the large-batch search: sparse columns proposed by the layer's own activation geometry --------------------------

def deep_rows(A: Tensor, offset: Tensor, points: Tensor) -> tuple[Tensor, int]:
    """Rows by how clearly they are inactive at each point: (N, m') indices, deepest first, and the largest number
    of inactive rows at any point (columns past it are active everywhere).

    A: (m', b) rows of W R^T over their norms, offset: (m',) the bias over the same norms, points: (N, b) coordinates
    p of inputs x = R^T p. Row j is inactive at x when a_j . p + offset_j < 0; sorted by that signed distance.
    """
    margins = points @ A.T + offset[None, :]
    order = torch.argsort(margins, dim=1)
    return order, int((margins < 0).sum(1).max())


def first_independent_rows(unit_rows: Tensor, rows: Tensor, dep_tol: float, block: int = 16
                           ) -> tuple[Tensor, Tensor]:
    """For each proposal, an orthonormal basis of its first b-1 linearly independent rows taken in the given order.

    unit_rows: (m', b); rows: (N, k) indices, deepest first. A row whose residual against the rows kept before it
    is at most dep_tol (relative) adds nothing and is passed over: the deepest rows are often inactive for several
    near-duplicate samples at once and span too few dimensions; the next independent rows, further down, are the
    ones that tell those samples apart. Only proposals still short of b-1 are scanned further. Returns basis
    (N, b, b-1) and count (N,): independent rows found (b-1 when complete).

    The scan takes `block` rows at a time: each block is projected off the basis as it stands in two batched
    products, then its rows are kept or passed over one by one against the few vectors the block itself added.
    The same Gram-Schmidt as one row at a time (up to rounding), but a (N, b, b-1) basis is read once per block
    instead of once per row: at b = 100 the row-by-row scan was two thirds of the large-batch search's time.
    """
    N, k = rows.shape
    b = unit_rows.shape[1]
    if k < b - 1:  # too few rows to complete any proposal: the scan below counts what they span
        basis = torch.zeros(N, b, b - 1, dtype=unit_rows.dtype, device=unit_rows.device)
        count = torch.zeros(N, dtype=torch.long, device=unit_rows.device)
    else:  # usually the b-1 deepest rows are independent already: one batched QR settles those proposals
        first = unit_rows[rows[:, : b - 1]].transpose(1, 2)                          # (N, b, b-1)
        Qf, Rf = torch.linalg.qr(first)
        done = (Rf.diagonal(dim1=1, dim2=2).abs() > dep_tol).all(dim=1)
        basis = torch.where(done[:, None, None], Qf, torch.zeros_like(Qf))
        count = torch.where(done, b - 1, 0)
    live = torch.nonzero(count < b - 1).flatten()
    pos = 0
    while pos < k:
        live = live[count[live] < b - 1]
        if live.numel() == 0:
            break
        stop = min(pos + block, k)
        B = basis[live]                                                                # (n, b, b-1)
        V = unit_rows[rows[live, pos:stop]]                                            # (n, s, b)
        R = V - (V @ B) @ B.mT                                                         # off the basis as it stands
        n, s = R.shape[0], R.shape[1]
        added = torch.zeros(n, b, s, dtype=R.dtype, device=R.device)                  # this block's new vectors
        c = count[live].clone()
        for i in range(s):
            r = R[:, i]
            if i:
                r = r - torch.einsum("nbs,ns->nb", added[:, :, :i], torch.einsum("nbs,nb->ns", added[:, :, :i], r))
            norm = r.norm(dim=1)
            add = (norm > dep_tol) & (c < b - 1)
            if bool(add.any()):
                idx = torch.nonzero(add).flatten()
                unit = r[idx] / norm[idx, None]
                added[idx, :, i] = unit
                basis[live[idx], :, c[idx]] = unit
                c[idx] += 1
        count[live] = c
        pos = stop
    return basis, count


def robust_kernels(unit_rows: Tensor, rows: Tensor, floor: float, dep_tol: float, gen: torch.Generator,
                   iters: int = 10) -> Tensor:
    """For each proposal, the direction most of its rows vanish on: dual principal component pursuit (Tsakiris &
    Vidal 2018) on its K deepest rows, then the exact kernel of the first b-1 independent rows it leaves closest to
    zero.

    unit_rows: (m', b); rows: (N, K) indices, deepest first, K a few times b. When a proposal lands near a sample's
    point p_i, most of its deepest rows lie in the zero set of column i, and those rows lie on the hyperplane
    q_i^perp: q_i is the normal of the hyperplane holding most of the K rows, the minimiser of ||U q||_1 over the
    sphere while the rows off it are few enough. `first_independent_rows` needs every one of the b-1 deepest
    independent rows in the zero set; here a minority outside it is tolerated, so points further from p_i propose
    q_i (measured at b = 64, width 1000, in the complement of the 36 least lonely samples' columns: 0 of 300
    proposals from the deepest rows hit one of the 28 others, 39 from these kernels, covering 11 of them; at b = 32
    tests/test_spear_dictionary.py checks the same contrast). Its limit: on 4b rows in b = 33 dimensions with the
    rows off the plane random, it needs about three quarters of them on it (20 of 20 draws at 110 of 132,
    none at 80: the same file's synthetic test).

    IRLS from the least-squares direction: each step takes one inverse iteration of the weighted Gram matrix
    U^T diag(1 / max(|U q|, floor)) U toward its smallest eigenvector (the reweighted problem's minimiser): a solve
    instead of an eigendecomposition. 10 steps separate the rows that vanish from the rest; the pursuit itself
    converges only linearly, so the direction is then the kernel of the rows closest to zero, taken in that order
    and skipping rows that add no dimension (duplicates), exact to rounding. Returns (c, b) unit directions, one
    per proposal whose rows span b-1 dimensions.
    """
    b = unit_rows.shape[1]
    U = unit_rows[rows]                                                               # (N, K, b)
    q = torch.linalg.eigh(U.mT @ U).eigenvectors[:, :, 0]
    for _ in range(iters):
        w = 1.0 / (U @ q[:, :, None]).abs().clamp_min(floor)                        # (N, K, 1)
        q = torch.linalg.solve((U * w).mT @ U, q[:, :, None])[:, :, 0]
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
    closest = torch.gather(rows, 1, torch.argsort((U @ q[:, :, None])[:, :, 0].abs(), dim=1))
    basis, count = first_independent_rows(unit_rows, closest, dep_tol)
    return complement(basis[count == b - 1], 1, gen)[:, :, 0]


def complement(basis: Tensor, d: int, gen: torch.Generator) -> Tensor:
    """d orthonormal vectors orthogonal to the columns of basis (N, b, c): Gram-Schmidt of random vectors, twice
    against the basis and the earlier ones (for rounding). Returns (N, b, d)."""
    N, b, _ = basis.shape
    out = torch.randn(N, b, d, generator=gen, dtype=_F64, device="cpu").to(basis.device)
    for i in range(d):
        v = out[:, :, i]
        for _ in range(2):
            v = v - torch.einsum("nbc,nc->nb", basis, torch.einsum("nbc,nb->nc", basis, v))
            if i:
                prev = out[:, :, :i]
                v = v - torch.einsum("nbc,nc->nb", prev, torch.einsum("nbc,nb->nc", prev, v))
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
        out[:, :, i] = v
    return out


def plane_columns(unit_rows: Tensor, plane: Tensor, tol: float, min_run: int, min_zeros: int) -> Tensor:
    """Columns inside 2-D kernels: the deep rows of near-duplicate samples are zero for both columns, so the
    kernel is the plane of the two; each column is the direction at which a run of further rows vanishes
    (SPEAR's plane screen, `plane_runs`). plane: (F, b, 2) orthonormal. Returns (c, b) unit directions and the
    plane each came from (c,)."""
    p1, p2 = unit_rows @ plane[:, :, 0].T, unit_rows @ plane[:, :, 1].T              # (m', F)
    angle, fam, _ = plane_runs(p1, p2, tol, min_run, min_zeros)
    # A row at angle t has unit coordinates (cos t, sin t); the direction that zeroes it is (-sin t, cos t).
    q = -torch.sin(angle)[:, None] * plane[fam, :, 0] + torch.cos(angle)[:, None] * plane[fam, :, 1]
    return q / q.norm(dim=1, keepdim=True), fam


def sparse_directions(L: Tensor, starts: Tensor, problem: Problem, iters: int = 40) -> Tensor:
    """Polish noisy candidates: local minimisers of ||L q||_1 over the unit sphere by iteratively reweighted least
    squares, from `starts` near a column. L: (m', b) raw active rows; starts: (K, b) unit.

    A column q_i makes L q_i zero on about half of the rows, so it is a sharp local minimum of the l1 norm over the
    sphere (dual principal component pursuit, Tsakiris & Vidal 2018). One IRLS step solves min sum_j w_j <l_j, q>^2
    with w_j = 1 / max(|<l_j, q>|, delta), delta the direction's noise level: under noise the minimiser weighs the
    zero rows by how close to zero they are, which beats the hard zero set of `refine` (measured: 41-47 dB against
    about 30 dB at sigma 1e-4, b = 8). From random starts the same iteration stalls at generic vertices (b - 1
    zeros; measured 0 of 128 starts at b = 32 on natural-image patches): it polishes, it does not search.
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



def sign_violations(A: Tensor, offset: Tensor, zeros: Tensor, limit: int | None = None) -> int:
    """Rows a single input cannot explain: the fewest rows whose ReLU state contradicts the zero pattern `zeros`
    for any input x = R^T p (scaled by s >= 0 against the bias), by linear programming.

    A: (m', b) rows of W R^T over their norms, offset: (m',) bias over the same norms, zeros: (m',) bool. A column of
    G is zero exactly where its sample is inactive, so a true column has none (up to noise at the boundary). A mix
    of correlated samples' columns can be sparser than any column: beyond as many samples as classes their output
    gradients are linearly dependent, and a mix is then zero where the samples are all inactive and where they are
    all active: no single input is inactive on the first rows and active on the second (measured at b = 64 on
    patches: 0 for every true column, about 640 of 1000 for such mixes). Solves min sum_j t_j subject to
    sign_j (a_j . p + s offset_j) >= 1 - t_j, t >= 0, s >= 0 (HiGHS); counts t_j > 1/2.

    limit: only whether the count exceeds it matters. The same program on every fifth row first: its count is a
    lower bound (fewer constraints, fewer violations), and when it is already above `limit` that bound is returned.
    A mix is then settled in about 0.3 s instead of about 12 s (b = 100, 2000 rows; a true column still needs the
    whole program, about 1.6 s).
    """
    if limit is not None and A.shape[0] >= 5 * (A.shape[1] + 1):
        every_fifth = torch.arange(0, A.shape[0], 5, device=A.device)
        bound = _fewest_violations(A[every_fifth], offset[every_fifth], zeros[every_fifth])
        if bound > limit:
            return bound
    return _fewest_violations(A, offset, zeros)


def _fewest_violations(A: Tensor, offset: Tensor, zeros: Tensor) -> int:
    """The linear program of `sign_violations` on these rows (identity block sparse)."""
    m, b = A.shape
    sign = np.where(zeros.cpu().numpy(), -1.0, 1.0)
    An, off = A.cpu().numpy(), offset.cpu().numpy()
    lhs = sparse.hstack([sparse.csr_matrix(np.hstack([-(sign[:, None] * An), -(sign * off)[:, None]])),
                         -sparse.eye(m)]).tocsr()
    cost = np.concatenate([np.zeros(b + 1), np.ones(m)])
    bounds = [(None, None)] * b + [(0, None)] * (m + 1)
    res = linprog(cost, A_ub=lhs, b_ub=-np.ones(m), bounds=bounds, method="highs")
    if res.x is None:
        return m
    return int((res.x[b + 1:] > 0.5).sum())


@dataclass
class DictionarySearch:
    """Candidates for the columns of Q proposed from the hyperplane arrangement of the attacked layer.

    Sample i is inactive exactly on the rows j with w_j . x_i + bias_j <= 0, and x_i = R^T p_i lies in the
    b-dimensional row space of R: in those coordinates every neuron is a known hyperplane (a_j = (W R^T)_j), and the
    zero set of column i is the set of hyperplanes that have p_i on their negative side. A proposal is a random point
    p; the rows most clearly negative at p (largest distance to their hyperplane) are negative at every point near p,
    so when p falls near some p_i they all lie in the zero set of column i, and the kernel of b-1 of them is q_i:
    SPEAR's proposal, with its rows chosen by the geometry instead of uniformly (success about 1 in 10 proposals at
    b = 32..64 instead of 2^-(b-1)). Points are drawn in the complement of the columns found so far (P^T Q = I: every
    other p_k is orthogonal to a found q_i), which removes the found samples' regions from the draw; one round in four
    draws from the whole space, so that a wrong early candidate cannot hide a column. The deepest rows at a point
    rarely all lie in one zero set once only the batch's lonely samples are left (inputs far from every other: their
    regions are small); one point in `_ROBUST_SHARE` therefore also proposes the kernel most of its deepest rows
    agree on (`robust_kernels`), which tolerates a minority of rows from other zero sets and reaches them.
    Each round refines the kernels on their zero rows (least squares, which averages noise), keeps those with at
    least `min_zeros` zeros and adds the new ones to the pool. `samples` counts proposals: the budget is counted.
    """

    problem: Problem
    L: Tensor            # (m', b) raw active rows of L
    unit: Tensor         # (m', b) the same rows over their norms
    A: Tensor            # (m', b) rows of W R^T on the active rows, over their norms
    offset: Tensor       # (m',) bias over the same norms
    pool: Tensor
    m: int
    min_zeros: int
    cands: Candidates
    dep_tol: float
    scale: float         # ||R^T p|| of a proposal: the inputs' typical norm
    angle_tol: float     # radians: rows of one run in a plane (`plane_columns`)
    min_run: int
    noisy: bool = False  # noise above float32 rounding: candidates are polished by IRLS (`sparse_directions`)
    scored: bool = False  # candidates ranked by `pattern_scores` (the noisy search's own pool)
    max_violations: int = -1  # > -1: selected candidates need a zero pattern one input explains (`screen`)
    checked: set[int] | None = None       # pool versions' candidate ids already screened (by direction bytes)
    samples: int = 0
    proposals: int = 0
    rounds: int = 0

    @classmethod
    def create(cls, problem: Problem, pool: Tensor, m: int, min_zeros: int, cands: Candidates,
               noisy: bool = False, moved: bool = False, scored: bool = False) -> "DictionarySearch":
        A = problem.WR[pool]
        norms = A.norm(dim=1).clamp_min(1e-300)
        return cls(problem=problem, L=problem.L[pool], unit=problem.unit_rows[pool], A=A / norms[:, None],
                   offset=problem.bias[pool] / norms, pool=pool, m=m, min_zeros=min_zeros, cands=cands,
                   dep_tol=min(0.25, max(1e-4, 30.0 * problem.tol)), scale=math.sqrt(problem.R.shape[1]),
                   angle_tol=min(1e-2, 10.0 * problem.tol), min_run=max(4, math.ceil(0.01 * pool.numel())),
                   noisy=noisy, scored=scored,
                   # Beyond _CHECK_PATTERNS_ABOVE samples mixes sparser than a column appear (`sign_violations`).
                   # Allowed violations: a noisy boundary, or local steps (patterns set at weights in between).
                   max_violations=-1 if problem.L.shape[1] <= _CHECK_PATTERNS_ABOVE else
                   max(3, math.ceil((0.1 if moved else 0.02) * pool.numel())))

    def found(self) -> Tensor:
        """(k, b), k < b: linearly independent directions of the columns found so far, sparsest first, for the draw's
        deflation. Left out: candidates dominated by another's zero set, and those whose zero set overlaps another
        candidate's by more than `_CLUSTER_OVERLAP` (near-duplicate samples and their mixes: a mix of a found and a
        missing column would take the missing sample's point out of the draw)."""
        b = self.L.shape[1]
        masks = self.cands.masks[self.pool].to(_F64)
        inter = masks.T @ masks
        sizes = masks.sum(0)
        overlap = inter / torch.minimum(sizes[:, None], sizes[None, :]).clamp_min(1)
        overlap.fill_diagonal_(0)
        clear = ~self.cands.dominated & (overlap.max(dim=1).values <= _CLUSTER_OVERLAP) if len(self.cands) > 1 \
            else ~self.cands.dominated
        kept_ids = torch.nonzero(clear).flatten()
        order = kept_ids[torch.argsort(self.cands.counts[kept_ids], descending=True, stable=True)]
        kept = independent_greedy(self.cands.directions, order.tolist(), b - 1, 1e-3)
        return self.cands.directions[kept]

    def screen(self, Q: Tensor, per_sample: Tensor) -> bool:
        """Set aside the pool's candidates chosen in Q (b, b) whose zero pattern no single input explains
        (`sign_violations`), looking only at positions whose samples show sign violations (per_sample: (b,)).
        Returns whether any was set aside."""
        if self.max_violations < 0 or len(self.cands) == 0:
            return False
        self.checked = set() if self.checked is None else self.checked
        chosen = (Q / Q.norm(dim=0, keepdim=True).clamp_min(1e-300)).T                  # (b, b) unit rows
        match = (chosen @ self.cands.directions.T).abs()                               # (b, c)
        bad = []
        for pos in torch.nonzero(per_sample > 0).flatten().tolist():
            i = int(match[pos].argmax())
            if float(match[pos, i]) < 1 - 1e-9:
                continue
            key = hash(self.cands.directions[i].cpu().numpy().tobytes())
            if key in self.checked:
                continue
            self.checked.add(key)
            if sign_violations(self.A, self.offset, self.cands.masks[self.pool, i],
                               self.max_violations) > self.max_violations:
                bad.append(i)
        self.cands.exclude(bad)
        return bool(bad)

    def round(self, starts: int, gen: torch.Generator) -> None:
        b = self.L.shape[1]
        self.rounds += 1
        points = torch.randn(starts, b, generator=gen, dtype=_F64, device="cpu").to(self.L.device)
        known = self.found()
        if self.rounds % 4 and known.shape[0] > 0:
            basis, _ = torch.linalg.qr(known.T)
            points = points - (points @ basis) @ basis.T
        # Scale: inputs of norm about sqrt(n) (standardised data) times a factor in [1/e, e], so that the bias
        # counts as much as it does for the real samples whatever their scale.
        spread = torch.exp(2 * torch.rand(starts, 1, generator=gen, dtype=_F64, device="cpu") - 1).to(self.L.device)
        points = points / (points @ self.problem.R).norm(dim=1, keepdim=True).clamp_min(1e-300) * self.scale * spread
        # Only rows inactive at the point can be in its sample's zero set: the scan stops at the first positive one.
        rows, negative = deep_rows(self.A, self.offset, points)
        basis, count = first_independent_rows(self.unit, rows[:, :negative], self.dep_tol)
        self.samples += starts
        self.proposals += starts
        line, plane = count == b - 1, count == b - 2
        q = complement(basis[line], 1, gen)[:, :, 0]
        # A share of the points also proposes the kernel most of its deep rows agree on (`robust_kernels`): about
        # as much time as the rest of the round, and the only proposals that reach the last, lonely samples.
        robust = min(starts, max(8, starts // _ROBUST_SHARE))
        q = torch.cat((q, robust_kernels(self.unit, rows[:robust, : _ROBUST_ROWS * b], max(1e-9, self.problem.tol),
                                          self.dep_tol, gen)))
        if bool(plane.any()):
            found, _ = plane_columns(self.unit, complement(basis[plane], 2, gen), self.angle_tol, self.min_run,
                                     self.min_zeros)
            q = torch.cat((q, found))
        zeros = noisy_zero_mask(self.problem, self.L, q)
        keep = zeros.sum(0) >= self.min_zeros
        q, zeros = q[keep], zeros[:, keep]
        if q.shape[0] == 0:
            return
        first = _distinct(q, zeros)
        q, zeros = q[first], zeros[:, first]
        for _ in range(2):  # least squares on all zero rows: exact gradients stay exact, noise averages out
            q = refine(self.L, q, zeros)
            zeros = noisy_zero_mask(self.problem, self.L, q)
        if self.noisy:
            q = sparse_directions(self.L, q, self.problem)
            zeros = noisy_zero_mask(self.problem, self.L, q)
        counts = zeros.sum(0)
        keep = counts >= self.min_zeros
        q, zeros, counts = q[keep], zeros[:, keep], counts[keep]
        order = torch.argsort(counts, descending=True, stable=True)
        q, zeros = q[order], zeros[:, order]
        first = _distinct(q, zeros)
        q, zeros = q[first], zeros[:, first]
        counts = zeros.sum(0)
        if len(self.cands) and q.shape[0]:
            fresh = ~_same(q, zeros, self.cands.directions, self.cands.masks[self.pool]).any(dim=1)
            q, zeros, counts = q[fresh], zeros[:, fresh], counts[fresh]
        if q.shape[0]:
            masks = torch.ones(self.m, q.shape[0], dtype=torch.bool, device=q.device)
            masks[self.pool] = zeros
            self.cands.add(q, counts, masks, self.pattern_scores(q) if self.scored else None)

    def pattern_scores(self, q: Tensor) -> Tensor:
        """(c,) for unit directions q (c, b): the share of its clearly decided rows that no single input explains.

        On a noisy gradient the zero count does not rank columns above mixes: the noise band that holds a column's
        zeros also holds the rows where a mix, or an active sample with a small output gradient, is merely small,
        and the certificate's band leaves every choice consistent (measured at sigma 1e-4 on the demo's patches:
        greedy choices by count kept 2 mixes at b = 24 and 5 at b = 32 though every column was in the pool). A
        true column is zero on its sample's inactive rows and clearly non-zero only where the sample is active, so
        one input explains its clear rows: `sign_violations` on the rows within `_CLEAR_ZERO` noise standard deviations of zero
        (inactive) or beyond `_CLEAR_ACTIVE` (active), the undecided rows left out.
        """
        values = (self.L @ q.T).abs() / direction_noise(self.problem, q)[None, :]        # (m', c)
        out = []
        for k in range(q.shape[0]):
            zero = values[:, k] <= _CLEAR_ZERO
            clear = zero | (values[:, k] >= _CLEAR_ACTIVE)
            rows = int(clear.sum())
            out.append(sign_violations(self.A[clear], self.offset[clear], zero[clear]) / rows if rows else 1.0)
        return torch.tensor(out, dtype=_F64, device=q.device)


def _same(q: Tensor, zeros: Tensor, q2: Tensor, zeros2: Tensor) -> Tensor:
    """(c, k) bool: the same column found twice: zero sets agreeing on 90% of their union and directions within
    about 0.8 degrees (noise moves a column less; near-duplicate samples' columns are further apart)."""
    return _same_zeros(zeros, zeros2) & ((q @ q2.T).abs() > 1 - 1e-4)


def _distinct(q: Tensor, zeros: Tensor) -> Tensor:
    """(c,) bool: directions that do not repeat an earlier one of the same batch (`_same`)."""
    return ~torch.tril(_same(q, zeros, q, zeros), diagonal=-1).any(dim=1)


def _same_zeros(a: Tensor, b: Tensor) -> Tensor:
    """(c, k) bool: zero sets a (m', c) and b (m', k) that agree on more than 90% of their union (one column)."""
    inter = a.to(_F64).T @ b.to(_F64)
    union = a.sum(0)[:, None] + b.sum(0)[None, :] - inter
    return (inter / union.clamp_min(1)) > 0.9


