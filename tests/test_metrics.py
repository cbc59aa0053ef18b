import math

import pytest
import torch

from fedsim.metrics import PSNR_CAP, match, psnr, score, ssim


def test_psnr_of_a_known_error():
    x = torch.full((2, 3, 8, 8), 0.5)
    assert psnr(x + 0.1, x).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)  # MSE 0.01 -> 20 dB
    assert psnr(x + 0.01, x)[0].item() == pytest.approx(40.0, abs=1e-3)


def test_ssim_is_one_for_identical_images_and_low_for_unrelated_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    assert ssim(x, x).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert float(ssim(torch.rand(3, 3, 32, 32, generator=g), x).mean()) < 0.05
    assert ssim(x[:, :1, :8, :8], x[:, :1, :8, :8]).tolist() == pytest.approx([1.0] * 3, abs=1e-6)  # tiny images


def test_matching_undoes_a_permutation_and_scores_once():
    g = torch.Generator().manual_seed(1)
    truth = torch.rand(5, 1, 8, 8, generator=g)
    perm = torch.tensor([3, 0, 4, 1, 2])
    rows, cols = match(truth[perm], truth)
    assert perm[torch.as_tensor(rows)].tolist() == cols.tolist()
    s = score(truth[perm], truth, recon_labels=perm, truth_labels=torch.arange(5))
    assert s.exact == 1.0 and s.psnr == PSNR_CAP and s.label_acc == 1.0 and s.matched == 5


def test_exact_means_relative_error_at_most_1e_3_and_counts_missing_samples():
    g = torch.Generator().manual_seed(2)
    truth = torch.rand(4, 3, 8, 8, generator=g) + 0.1
    near = truth * (1 + 5e-4)        # relative error 5e-4: exact
    far = truth * (1 + 5e-3)         # relative error 5e-3: not exact
    assert score(near, truth).exact == 1.0
    assert score(far, truth).exact == 0.0
    assert score(near[:2], truth).exact == 0.5    # two of four recovered
    mixed = torch.cat([near[:3], far[3:]])
    assert score(mixed, truth).exact == 0.75


def test_label_accuracy_without_images_uses_the_multiset_of_labels():
    s = score(None, torch.zeros(4, 1, 8, 8), recon_labels=torch.tensor([1, 1, 2, 9]),
              truth_labels=torch.tensor([1, 2, 3, 1]))
    assert s.label_acc == 0.75 and s.psnr is None and s.exact is None


def test_vectors_get_psnr_over_their_range_and_no_ssim():
    truth = torch.linspace(-2, 2, 40).reshape(2, 20)
    s = score(truth + 0.04, truth, images=False)
    assert s.ssim is None
    assert s.psnr == pytest.approx(10 * math.log10(16 / 0.0016), abs=1e-3)


def _images(n, seed, side=8):
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(seed))


def test_samples_the_attack_did_not_return_count_as_failures_in_every_average():
    truth = _images(4, 3)
    pool = torch.cat([truth, _images(40, 4)])
    full, half = score(truth.clone(), truth, partition_pixels=pool), score(truth[:2].clone(), truth, partition_pixels=pool)
    assert full.identified == 1.0 and full.recovered == 1.0 and full.exact == 1.0 and full.psnr == PSNR_CAP
    assert half.identified == 0.5 and half.recovered == 0.5 and half.exact == 0.5
    grey = float(psnr(torch.full_like(truth[2:], 0.5), truth[2:]).mean())     # a missing sample: the mid-grey guess
    assert half.psnr == pytest.approx((2 * PSNR_CAP + 2 * grey) / 4, rel=1e-5)
    assert half.ssim < 0.6 < full.ssim and half.per_sample_identified == (True, True, False, False)


def test_an_attack_that_raised_recovers_nothing():
    truth = _images(4, 5)
    s = score(None, truth, partition_pixels=truth, failed=True)
    assert (s.identified, s.recovered, s.exact, s.matched) == (0.0, 0.0, 0.0, 0)
    assert s.psnr == pytest.approx(float(psnr(torch.full_like(truth, 0.5), truth).mean()), rel=1e-5)


def test_identified_needs_the_reconstruction_nearer_its_true_sample_than_a_near_duplicate():
    """The client holds x and a near-duplicate x'; a reconstruction between them does not identify x."""
    truth = _images(2, 6)
    twin = (truth[0] + 0.02 * torch.randn(truth[0].shape, generator=torch.Generator().manual_seed(7))).clamp(0, 1)
    pool = torch.cat([truth, twin[None], truth[1:].clone(), _images(20, 8)])   # truth[1] held twice: one sample
    towards_x = torch.stack([0.6 * truth[0] + 0.4 * twin, truth[1]])
    towards_twin = torch.stack([0.4 * truth[0] + 0.6 * twin, truth[1]])
    assert score(towards_x, truth, partition_pixels=pool).per_sample_identified == (True, True)
    assert score(towards_twin, truth, partition_pixels=pool).per_sample_identified == (False, True)
    # both look like the original: recovered by SSIM, but only one picks the right sample out
    assert score(towards_twin, truth, partition_pixels=pool).recovered == 1.0


def test_noise_keeps_a_sample_identified_long_after_it_stops_being_exact_or_recovered():
    truth = _images(4, 9, side=16)
    pool = torch.cat([truth, _images(60, 10, side=16)])
    g = torch.Generator().manual_seed(11)
    slight = score(truth + 0.01 * torch.randn(truth.shape, generator=g), truth, partition_pixels=pool)
    heavy = score(truth + 0.3 * torch.randn(truth.shape, generator=g), truth, partition_pixels=pool)
    assert slight.exact == 0.0 and slight.recovered == 1.0 and slight.identified == 1.0
    assert heavy.recovered == 0.0 and heavy.identified == 1.0
    unrelated = score(_images(4, 12, side=16), truth, partition_pixels=pool)
    assert unrelated.identified <= 0.25 and unrelated.recovered == 0.0


def test_the_recovered_threshold_is_a_parameter_and_is_recorded():
    truth = _images(4, 13, side=16)
    noisy = truth + 0.05 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(14))
    loose, strict = score(noisy, truth, recovered_ssim=0.5), score(noisy, truth, recovered_ssim=0.999)
    assert (loose.recovered, loose.recovered_ssim) == (1.0, 0.5) and (strict.recovered, strict.recovered_ssim) == (0.0, 0.999)
    assert loose.identified is None   # no partition given: not measured


def test_label_set_accuracy_counts_the_recovered_label_multiset_whatever_the_image_matching():
    """Images matched to the wrong samples make `label_acc` low; the label multiset is still exactly right."""
    truth = torch.stack([torch.full((1, 4, 4), v) for v in (0.1, 0.4, 0.7, 0.9)])
    labels = torch.tensor([3, 3, 5, 7])
    recon = truth.flip(0)                                      # images in reverse order: matched back to front
    s = score(recon, truth, recon_labels=labels, truth_labels=labels)
    assert s.label_acc == 0.0 and s.label_set_acc == 1.0       # recon 0 (=truth 3, label 7) carries label 3, ...
    s = score(recon, truth, recon_labels=torch.tensor([3, 5, 5, 0]), truth_labels=labels)
    assert s.label_set_acc == 0.5                              # {3, 5} of {3, 3, 5, 7}
    s = score(None, truth, recon_labels=torch.tensor([7, 3, 1, 1]), truth_labels=labels)
    assert s.label_acc == s.label_set_acc == 0.5               # labels only: one multiset overlap


def test_scores_carry_the_one_matching_the_grids_reuse():
    from fedsim.metrics import match, score

    g = torch.Generator().manual_seed(0)
    truth = torch.rand(4, 1, 6, 6, generator=g)
    recon = truth[[2, 0, 3]] + 0.01 * torch.rand(3, 1, 6, 6, generator=g)
    rows, cols = match(recon, truth)
    pairs = score(recon, truth).pairs
    assert pairs == tuple(zip(rows.tolist(), cols.tolist())) and sorted(pairs) == [(0, 2), (1, 0), (2, 3)]
