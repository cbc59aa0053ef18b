"""SPEAR's sampling search (paper, steps 2-3): families of (b-2)-row submatrices, screened by shared angles."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedsim.attacks.spear.factorisation import (_CONFIRM_ROWS, _F64, _MIN_PLANE_NORM, _SAME, _SCREEN_ELEMENTS, refine,
    zero_mask)
from fedsim.attacks.spear.selection import Candidates


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
    lengths = torch.zeros(p1.shape[1], p1.shape[0], dtype=torch.long, device=p1.device)
    lengths.scatter_add_(1, run_id.T, (~torch.isnan(theta)).T.long())
    n_common = common.sum(0)
    passes = (lengths >= min_run) & (lengths + n_common[:, None] >= min_zeros)       # (F, runs)
    start = ~close & passes.T.gather(0, run_id)
    pos, fam = torch.nonzero(start, as_tuple=True)
    return theta[pos, fam], fam, common[:, fam]


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
            masks = torch.ones(self.m, int(keep.sum()), dtype=torch.bool, device=q.device)
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
        common = torch.zeros(self.act_rows.shape[0], q.shape[0], dtype=torch.bool, device=q.device)
        common[rows] = common_local
        if cond.shape[0]:
            q, ok = lift(self.act_rows, q, cond, self.cond_masks, self.pair_tol, self.min_run)
            q, common = q[ok], common[:, ok]
        self.accept(q, common)

    def screen_plane(self) -> None:
        """b = 2: the kernel of no rows is the whole plane; one family, counted on every active row."""
        device = self.act_rows.device
        chol = torch.tensor([[1.0], [0.0], [1.0]], dtype=_F64, device=device)
        self.examine(torch.arange(self.act_rows.shape[0], device=device), torch.empty(1, 0, 2, dtype=_F64, device=device),
                     chol, torch.empty(0, 2, dtype=_F64, device=device))
        self.samples, self.proposals = 1, self.act_rows.shape[0]

    def conditioning(self, subset: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Found directions to condition the next families on, and the active rows in all of their zero sets.

        Non-dominated candidates are taken in random order while their common zero set keeps enough rows to draw
        a family and screen it. Returns cond: (f, b) (f may be 0) and rows: (r,) active-row indices.
        """
        m_act, b = self.act_rows.shape
        free = torch.nonzero(~self.cands.dominated).flatten()
        free = free[torch.randperm(free.numel(), generator=gen, device="cpu").to(free.device)]
        inside = torch.ones(m_act, dtype=torch.bool, device=free.device)
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
        device = self.act_rows.device
        cond, rows = self.conditioning(subset, gen) if deflate else (torch.empty(0, b, dtype=_F64, device=device),
                                                                      torch.arange(m_act, device=device))
        d = b - 2 - cond.shape[0]
        s_rows = min(rows.numel(), max(subset, _SCREEN_ELEMENTS // K))
        # S may share rows with a family's B: those vanish on the whole plane and have no angle (`line_angles`).
        perm = rows[torch.randperm(rows.numel(), generator=gen, device="cpu").to(device)]
        subset_idx = perm[:s_rows]
        family = self.act_rows[rows[distinct_draws(rows.numel(), K, d, gen).to(device)]]    # (K, b-2-f, b)
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
    exactly singular submatrices that `family_kernels` drops. On the CPU, where `gen` draws.
    """
    if d * (d - 1) <= 0.1 * r or d == 0:
        return torch.randint(0, r, (K, d), generator=gen, device="cpu")
    perm = torch.arange(r, device="cpu").repeat(K, 1)
    rows = torch.arange(K, device="cpu")
    for i in range(d):
        j = i + (torch.rand(K, generator=gen, device="cpu") * (r - i)).long().clamp_max(r - i - 1)
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
    ok = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
    for k in range(f):
        others = torch.ones(f, dtype=torch.bool, device=p.device)
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
        lengths = torch.zeros(out.shape[0], theta.shape[0], dtype=torch.long, device=out.device)
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
        return torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    return ((q @ known.T).abs() > 1 - _SAME).any(dim=1)


def _parallel_to_earlier(q: Tensor) -> Tensor:
    """(c,) bool: row i of q parallel to a row j < i."""
    if q.shape[0] < 2:
        return torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    return torch.tril((q @ q.T).abs() > 1 - _SAME, diagonal=-1).any(dim=1)


