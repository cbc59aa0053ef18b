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
  off (b-2)-row solves, loses the columns; there the large-batch solver runs (`DictionarySearch`): columns proposed
  from the layer's hyperplane arrangement, refined as the least-squares kernels of their zero rows and polished by
  IRLS (`sparse_directions`), so the answer averages the noise of hundreds of rows. Under noise the zero count no
  longer ranks columns above mixes, and the certificate's band accepts any choice; candidates are then ranked by
  the share of their clear rows that no single input explains (`DictionarySearch.pattern_scores`). A direction
  of the batch below the noise's own largest singular value is gone (`noise_limited`: no answer is exact), but the
  samples it hardly involves are not, so the search still runs; when a quarter of the directions or more are gone
  SPEAR says so in seconds (`stop_reason` "noise") instead of spending its budget. What the noise leaves to any
  attack on this layer, least squares with every sample's true output gradient, is measured beside SPEAR's answer
  by benchmarks/spear_noise_ceiling.py.
* FedAvg. -delta / lr over T local steps is sum_t G_t X_t^T: rank = distinct samples (`distinct_samples`), right
  factor = the inputs, dbias = the column sums; only the ReLU patterns move with W. The certificate judges a
  pre-activation only where its sign holds at both ends of the round with a margin as wide as the movement.
* Aggregates: a secure aggregate of k clients is one batch of the summed size, attacked at the default budget.
* Large batches: the sampling search costs about 2^b proposals; `dictionary.py` proposes each column from the
  points of the inputs' coefficient space instead, with the deepest rows at a point and, robustly, the hyperplane
  most of them lie on (its docstring, and BENCHMARKS.md for b = 16 to 100).
* Budgets are counted (sampled families or proposed points), so an answer does not depend on the machine; the wall-clock cap is
  a safety net that the result reports (`budget_exhausted`, `stop_reason`).

The certificate (`certified=True` implies every returned sample is one of the batch's to relative error 1e-3):
(1) the sign pattern of W x + bias agrees with the zeros of G = L Q (paper, Sec. 4), judged outside noise bands;
(2) the bias relation holds; (3) each sample is pinned: its column is the least-squares kernel of its zero rows
Z_i, and noise of the measured level on those rows moves it by about s_i sqrt(sum_k>=2 1/lambda_k(L_Z^T L_Z)),
carried to x_i through Q^-1 (`sample_errors`); all estimates times 10 must stay within 1e-3. The zero set for (3)
uses the noise's own threshold, never the search's looser tolerance, so it does not grow with ill-conditioning,
and holds only rows where the recovered pre-activation is clearly negative. The noise is taken row by row, a
column that fits its zero rows worse than the noise says is tilted as much more, and the bias gradient's noise
moves each scale. Why (3): near-duplicate samples have zero sets that differ on a few rows; a direction between
their columns is zero on the intersection and passes (1) and (2), since the pre-activations that tell them apart
are near zero. Those rows then do not count, its zero set has a second, almost-null direction (lambda_2 ~ 0): the
estimate is large and the sample is not certified. Such a consistent but unpinned choice does not end the search
(it may be wrong: clip 0.1 on digits, client 2 of 4, PSNR 8.6 dB after 192 samples): a pinned choice replaces it,
and the search stops on it only after a long stretch without one (`stop_reason` "unpinned"). tests/test_spear.py checks
near-duplicates at several distances and seeds (with both searches), noisy, multi-step and aggregated updates,
samples a trained model already fits, and a fuzz over random batches; tests/test_federation.py a FedAvg update
holding two samples at cosine 0.97: no certified answer is wrong. The per-sample estimates are returned
(`sample_errors`) as a confidence; they are of the order of the real errors (3e-8 estimated vs 8e-8 measured on a
batch of 8 natural-image crops; 6.4% vs 6.9% on the FedAvg update's unpinned sample).

`reconstruct` is the pure algorithm on tensors; the `Spear` attack wraps it for `fedsim` observations.
"""

from __future__ import annotations

from fedsim.attacks.spear.attack import Spear, distinct_samples, first_linear_relu
from fedsim.attacks.spear.factorisation import (Consistency, Factorisation, Problem, SpearResult, estimate_rank, factorise,
    prepare, zero_tolerance)
from fedsim.attacks.spear.selection import certify, sample_errors, select
from fedsim.attacks.spear.solve import reconstruct

__all__ = ["Consistency", "Factorisation", "Problem", "Spear", "SpearResult", "certify", "distinct_samples",
           "estimate_rank", "factorise", "first_linear_relu", "prepare", "reconstruct", "sample_errors", "select",
           "zero_tolerance"]
