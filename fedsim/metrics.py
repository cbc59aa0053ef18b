"""Scoring reconstructions against ground truth, in pixel space [0, 1].

Reconstructions are matched to true samples once (Hungarian assignment on MSE); every metric then uses that one
matching. Only the scorer sees ground truth (the client's batch and, for `identified`, its whole partition);
attacks never do. Every rate and average is over the client's whole batch: a true sample the attack did not
return counts as a failed reconstruction (it is scored as the uninformative guess, mid-grey for images, the middle
of the data's range for vectors), never as missing, so returning fewer samples never looks better.

- `identified`: fraction of the batch whose matched reconstruction picks out its true sample among the client's
  whole partition: the reconstruction is strictly nearer (pixel space, L2) to its true sample than to any other
  sample of the partition (in the spirit of breaching's image identifiability precision). None when no partition
  is given.
- `recovered`: fraction of the batch reconstructed at SSIM >= `recovered_ssim` (default 0.9; recorded beside it).
  Images only (None for vectors).
- `exact`: fraction of the batch recovered exactly: relative L2 error ||x_hat - x|| / ||x|| <= 1e-3 (unclamped
  pixels).
- `psnr`: 10 log10(1 / MSE) per image (pixels clamped to [0, 1], capped at 100 dB), averaged over the batch.
- `ssim`: structural similarity (torchmetrics, Gaussian window shrunk for small images), averaged over the batch.
- `mse`: mean squared error per image, averaged over the batch.
- `label_acc`: fraction of true labels recovered (matched pairs when inputs exist, multiset overlap otherwise).
- `label_set_acc`: fraction of true labels recovered as a multiset, whatever the image matching: the overlap of
  the recovered and the true label multisets over the batch (label-only attacks recover exactly this).

An attack that returns no inputs at all (`inputs=None`, e.g. label inference) makes no claim on the images: their
metrics are None. An attack that raised is scored as returning nothing (`failed=True`): every rate 0.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

EXACT_TOLERANCE = 1e-3
RECOVERED_SSIM = 0.9  # default SSIM at or above which a sample counts as recovered (a reader would recognise it)
IDENTIFIED_SLACK = 1e-10  # relative squared distance under which a partition sample is the true sample itself
# The metric columns, named once: what each attack row of results.jsonl carries from its `Scores` (in this order),
# and the headline metrics a study averages per job and trackers log per round.
SCORE_COLUMNS = ("identified", "exact", "recovered", "psnr", "ssim", "mse", "label_acc", "label_set_acc", "matched",
                 "batch", "recovered_ssim")
HEADLINE_METRICS = ("identified", "exact", "recovered", "psnr", "ssim", "label_acc")
PSNR_CAP = 100.0  # dB; an exact reconstruction has MSE ~0, so PSNR is capped to stay finite in averages and JSON


@dataclass(frozen=True)
class Scores:
    """Scores of one reconstruction. Metrics are None when they do not apply (no inputs, no labels, vectors)."""

    psnr: float | None = None
    ssim: float | None = None
    mse: float | None = None
    exact: float | None = None
    identified: float | None = None
    recovered: float | None = None
    recovered_ssim: float | None = None  # the SSIM threshold of `recovered`
    label_acc: float | None = None
    label_set_acc: float | None = None  # multiset overlap / b, independent of the image matching
    matched: int = 0               # reconstructions paired with a true sample
    batch: int = 0                 # true samples
    per_sample_psnr: tuple[float, ...] = ()  # in the order of the true samples (NaN when unmatched)
    per_sample_identified: tuple[bool, ...] = ()  # in the order of the true samples (empty without a partition)
    pairs: tuple[tuple[int, int], ...] = ()  # the one matching: (reconstruction index, true sample index) per pair


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-sample PSNR in dB of (b, ...) tensors; inf where identical."""
    mse_ = (x - y).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse_)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per-sample SSIM of (b, C, H, W) images in [0, 1] (Gaussian window: 11 px, sigma 1.5; smaller for tiny images)."""
    # heavy: torchmetrics loads only when SSIM is computed
    from torchmetrics.functional.image import structural_similarity_index_measure

    side = min(x.shape[-2:])
    kernel = min(11, side if side % 2 == 1 else side - 1)
    sigma = 1.5 * kernel / 11
    values = structural_similarity_index_measure(
        x.double(), y.double(), data_range=1.0, kernel_size=kernel, sigma=sigma, reduction="none")
    return values.float()


def relative_error(x: Tensor, y: Tensor) -> Tensor:
    """Per-sample ||x - y|| / ||y|| of (b, ...) tensors."""
    diff = (x - y).flatten(1).double().norm(dim=1)
    return diff / y.flatten(1).double().norm(dim=1).clamp_min(1e-12)


def match(recon: Tensor, truth: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian assignment minimising total MSE: (recon indices, truth indices), each of length min(b_hat, b)."""
    cost = torch.cdist(recon.flatten(1).double(), truth.flatten(1).double()).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return rows, cols


def score(recon_pixels: Tensor | None, truth_pixels: Tensor, *, recon_labels: Tensor | None = None,
          truth_labels: Tensor | None = None, images: bool = True, partition_pixels: Tensor | None = None,
          recovered_ssim: float = RECOVERED_SSIM, failed: bool = False) -> Scores:
    """Score a reconstruction. Pixels: (b_hat, ...) and (b, ...) in [0, 1] space (recon not yet clamped).

    `images=False` (vector data): psnr uses the true samples' value range, and ssim is not computed.
    `partition_pixels` (N, ...): the client's whole partition, which holds the batch (for `identified`).
    `failed`: the attack raised; it is scored as having returned nothing.
    """
    b = truth_pixels.shape[0]
    truth_pixels = truth_pixels.detach().cpu().float()
    if failed:
        recon_pixels = truth_pixels[:0]
    label_acc = label_set_acc = None
    if recon_labels is not None and truth_labels is not None and not failed:
        label_set_acc = _multiset_overlap(recon_labels.cpu(), truth_labels.cpu()) / b
    if recon_pixels is None:  # no claim on the inputs (label inference)
        return Scores(label_acc=label_set_acc, label_set_acc=label_set_acc, batch=b,
                      per_sample_psnr=tuple([float("nan")] * b))

    recon_pixels = recon_pixels.detach().cpu().float().reshape(recon_pixels.shape[0], *truth_pixels.shape[1:])
    if images:
        data_range, blank = 1.0, 0.5
    else:
        low, high = float(truth_pixels.min()), float(truth_pixels.max())
        data_range, blank = (high - low) or 1.0, (high + low) / 2
    # every true sample gets a reconstruction: the attack's matched one, else the uninformative guess
    filled = torch.full_like(truth_pixels, blank)
    returned = torch.zeros(b, dtype=torch.bool)
    rows, cols = (match(recon_pixels, truth_pixels) if recon_pixels.shape[0] > 0
                  else (np.zeros(0, dtype=int), np.zeros(0, dtype=int)))
    filled[torch.as_tensor(cols, dtype=torch.long)] = recon_pixels[torch.as_tensor(rows, dtype=torch.long)]
    returned[torch.as_tensor(cols, dtype=torch.long)] = True
    exact_each = (relative_error(filled, truth_pixels) <= EXACT_TOLERANCE) & returned
    shown = filled.clamp(0.0, 1.0) if images else filled
    mse_each = (shown - truth_pixels).pow(2).flatten(1).mean(dim=1)
    psnr_each = psnr(shown, truth_pixels, data_range).clamp(max=PSNR_CAP)
    ssim_each = ssim(shown, truth_pixels) if images and truth_pixels.dim() == 4 else None
    recovered = None
    if ssim_each is not None:
        recovered = float(((ssim_each >= recovered_ssim) & returned).sum()) / b
    identified_each: tuple[bool, ...] = ()
    if partition_pixels is not None:
        identified_each = tuple((nearest_is_true(filled, truth_pixels, partition_pixels) & returned).tolist())
    if recon_labels is not None and truth_labels is not None:
        label_acc = float((recon_labels.cpu()[rows] == truth_labels.cpu()[cols]).sum()) / b
    per_sample = [float(v) if r else float("nan") for v, r in zip(psnr_each.tolist(), returned.tolist())]
    return Scores(psnr=float(psnr_each.mean()), ssim=float(ssim_each.mean()) if ssim_each is not None else None,
                  mse=float(mse_each.mean()), exact=float(exact_each.sum()) / b,
                  identified=sum(identified_each) / b if partition_pixels is not None else None,
                  recovered=recovered, recovered_ssim=recovered_ssim if recovered is not None else None,
                  label_acc=label_acc, label_set_acc=label_set_acc, matched=len(rows), batch=b,
                  per_sample_psnr=tuple(per_sample), per_sample_identified=identified_each,
                  pairs=tuple(zip(rows.tolist(), cols.tolist())))


def nearest_is_true(recon: Tensor, truth: Tensor, partition: Tensor) -> Tensor:
    """(b,) bool: whether recon[i] is strictly closer (L2, pixel space) to truth[i] than to any other sample of the
    partition, which holds the batch. Exact copies of the true sample are the same sample (not competitors); a
    near-duplicate is a competitor, so a reconstruction between the two identifies neither reliably."""
    r, t = recon.flatten(1).double(), truth.flatten(1).double()
    pool = partition.detach().cpu().flatten(1).double()
    d_true = (r - t).pow(2).sum(dim=1)
    same = torch.cdist(t, pool).pow(2) <= IDENTIFIED_SLACK * t.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-12)
    d_other = torch.cdist(r, pool).pow(2).masked_fill(same, math.inf).min(dim=1).values
    return d_true < d_other


def _multiset_overlap(a: Tensor, b: Tensor) -> int:
    ca, cb = Counter(a.tolist()), Counter(b.tolist())
    return sum((ca & cb).values())
