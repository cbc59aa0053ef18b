"""Scoring reconstructions against ground truth, in pixel space [0, 1].

Reconstructions are matched to true samples once (Hungarian assignment on MSE); every metric then uses that one
matching. Only the scorer sees ground truth; attacks never do.

- `psnr`: 10 log10(1 / MSE) per image (pixels clamped to [0, 1]), averaged over matched pairs.
- `ssim`: structural similarity (torchmetrics, Gaussian window shrunk for small images), averaged over pairs.
- `mse`: mean squared error per image, averaged over pairs.
- `exact`: fraction of TRUE samples recovered exactly: relative L2 error ||x_hat - x|| / ||x|| <= 1e-3
  (unclamped pixels). Unmatched true samples count as not recovered.
- `label_acc`: fraction of true labels recovered (matched pairs when inputs exist, multiset overlap otherwise).
- `label_set_acc`: fraction of true labels recovered as a multiset, whatever the image matching: the overlap of
  the recovered and the true label multisets over the batch (label-only attacks recover exactly this).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

EXACT_TOLERANCE = 1e-3
PSNR_CAP = 100.0  # dB; an exact reconstruction has MSE ~0, so PSNR is capped to stay finite in averages and JSON


@dataclass(frozen=True)
class Scores:
    """Scores of one reconstruction. Metrics are None when they do not apply (no inputs, no labels, vectors)."""

    psnr: float | None = None
    ssim: float | None = None
    mse: float | None = None
    exact: float | None = None
    label_acc: float | None = None
    label_set_acc: float | None = None  # multiset overlap / b, independent of the image matching
    matched: int = 0               # reconstructions paired with a true sample
    batch: int = 0                 # true samples
    per_sample_psnr: tuple[float, ...] = ()  # in the order of the true samples (NaN when unmatched)


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-sample PSNR in dB of (b, ...) tensors; inf where identical."""
    mse_ = (x - y).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse_)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per-sample SSIM of (b, C, H, W) images in [0, 1] (Gaussian window: 11 px, sigma 1.5; smaller for tiny images)."""
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
          truth_labels: Tensor | None = None, images: bool = True) -> Scores:
    """Score a reconstruction. Pixels: (b_hat, ...) and (b, ...) in [0, 1] space (recon not yet clamped).

    `images=False` (vector data): psnr uses the true samples' value range, and ssim is not computed.
    """
    b = truth_pixels.shape[0]
    label_acc = label_set_acc = None
    if recon_labels is not None and truth_labels is not None:
        label_set_acc = _multiset_overlap(recon_labels.cpu(), truth_labels.cpu()) / b
    if recon_pixels is None or recon_pixels.shape[0] == 0:
        return Scores(label_acc=label_set_acc, label_set_acc=label_set_acc, batch=b,
                      per_sample_psnr=tuple([float("nan")] * b))

    recon_pixels = recon_pixels.detach().cpu().float().reshape(recon_pixels.shape[0], *truth_pixels.shape[1:])
    truth_pixels = truth_pixels.detach().cpu().float()
    rows, cols = match(recon_pixels, truth_pixels)
    r, t = recon_pixels[rows], truth_pixels[cols]
    exact = float((relative_error(r, t) <= EXACT_TOLERANCE).sum()) / b
    if images:
        r_clamped = r.clamp(0.0, 1.0)
        data_range = 1.0
    else:
        r_clamped = r
        data_range = float(truth_pixels.max() - truth_pixels.min()) or 1.0
    mse_each = (r_clamped - t).pow(2).flatten(1).mean(dim=1)
    psnr_each = psnr(r_clamped, t, data_range).clamp(max=PSNR_CAP)
    ssim_value = float(ssim(r_clamped, t).mean()) if images and t.dim() == 4 else None
    per_sample = [float("nan")] * b
    for col, value in zip(cols.tolist(), psnr_each.tolist()):
        per_sample[col] = value
    if recon_labels is not None and truth_labels is not None:
        label_acc = float((recon_labels.cpu()[rows] == truth_labels.cpu()[cols]).sum()) / b
    return Scores(psnr=float(psnr_each.mean()), ssim=ssim_value, mse=float(mse_each.mean()), exact=exact,
                  label_acc=label_acc, label_set_acc=label_set_acc, matched=len(rows), batch=b, per_sample_psnr=tuple(per_sample))


def _multiset_overlap(a: Tensor, b: Tensor) -> int:
    ca, cb = Counter(a.tolist()), Counter(b.tolist())
    return sum((ca & cb).values())
