"""The least-squares ceiling (`fedsim.ceiling`): what an update leaves of its batch to an attacker with every
sample's output gradient, computed by the scorer from the ground truth, next to every attack's score."""

from __future__ import annotations

import torch

from fedsim.ceiling import layer_ceiling
from fedsim.data import load_dataset
from fedsim.metrics import score
from fedsim.models import build_model
from fedsim.protocol import GroundTruth
from fedsim.threat import TrainMeta
from tests.test_spear import client_gradient, demo_case, draw_batch, true_output_gradients


def _meta(data, mode: str = "fedsgd") -> TrainMeta:
    return TrainMeta(mode=mode, input_shape=tuple(data.input_shape), num_classes=data.num_classes)


def test_the_ceiling_is_least_squares_with_the_true_output_gradients_of_a_clipped_noisy_update():
    """sigma 1e-4, clip 1, b = 24 (demo_case seed 0): the clipping factor is fitted, not known, and the ceiling
    is the benchmark's (38.5 dB, benchmarks/spear_noise_ceiling.py), where SPEAR gets 35.9 dB."""
    b, seed = 24, 0
    data, model, x, noisy = demo_case(1e-4, b, seed)
    _, y = draw_batch(data, b, seed)
    estimate = layer_ceiling(model, noisy, GroundTruth(x, y), _meta(data))
    reference = torch.linalg.lstsq(true_output_gradients(b, seed), noisy["net.1.weight"].double()).solution
    assert estimate is not None and estimate.shape == x.shape
    assert float((estimate.double().flatten(1) - reference).norm() / reference.norm()) < 1e-3   # c fitted, float32
    to_pixels = data.normalization.to_pixels
    psnr = score(to_pixels(estimate), to_pixels(x)).psnr
    assert 38 <= psnr <= 39
    assert abs(psnr - score(to_pixels(reference.float().reshape(x.shape)), to_pixels(x)).psnr) < 0.05


def test_an_exact_update_has_an_exact_ceiling_and_other_settings_have_none():
    data = load_dataset({"name": "digits"})
    model = build_model({"name": "fc", "widths": [256, 256]}, data.input_shape, data.num_classes, seed=0)
    x, y = draw_batch(data, 8, 0)
    grads = client_gradient(model, x, y)
    exact = layer_ceiling(model, grads, GroundTruth(x, y), _meta(data))
    assert exact is not None and float((exact - x).norm() / x.norm()) < 1e-4
    assert layer_ceiling(model, grads, GroundTruth(x, y), _meta(data, "fedavg")) is None   # several steps' patterns
    lenet = build_model({"name": "lenet"}, data.input_shape, data.num_classes, seed=0)     # no Linear first layer
    assert layer_ceiling(lenet, client_gradient(lenet, x, y), GroundTruth(x, y), _meta(data)) is None
