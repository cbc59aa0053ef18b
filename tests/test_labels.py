"""Analytic label recovery (attacks/labels.py): iDLG and Yin are exact in their settings, LLG handles repeats."""

from __future__ import annotations

import pytest
import torch

from fedsim.attacks.base import build_attack
from fedsim.attacks.labels import (LastLinear, find_last_linear, last_layer_gradient, llg_labels, recover_labels,
                            samples_in_update)
from fedsim.attacks.matching import model_gradients
from fedsim.errors import AttackNotApplicable
from fedsim.models import build_model
from fedsim.threat import Observation, TrainMeta

SHAPE = (3, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py; `patches` comes from there too


def multiset_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Share of predicted labels that match a true label, each true label used once (LLG's accuracy)."""
    remaining = true.tolist()
    hits = 0
    for label in predicted.tolist():
        if label in remaining:
            remaining.remove(label)
            hits += 1
    return hits / len(predicted)


def batch(data, size: int, distinct: bool, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if distinct:
        classes = torch.randperm(data.num_classes, generator=gen)[:size]
        idx = torch.stack([torch.nonzero(data.train_y == c).flatten()[torch.randint(0, 100, (1,), generator=gen)]
                           for c in classes]).flatten()
    else:
        idx = torch.randint(0, len(data.train_y), (size,), generator=gen)
    return data.train_x[idx], data.train_y[idx]


def last_layer(model_name: str, x: torch.Tensor, y: torch.Tensor, seed: int, classes: int = 8):
    model = build_model({"name": model_name}, SHAPE, classes, seed)
    grads = model_gradients(model, x, y, create_graph=False)
    return last_layer_gradient(model, grads, SHAPE)


def mean_accuracy(data, model_name: str, size: int, distinct: bool, method: str, trials: int = 20) -> float:
    gen = torch.Generator().manual_seed(1)
    scores = []
    for trial in range(trials):
        x, y = batch(data, size, distinct, gen)
        grad_w, grad_b = last_layer(model_name, x, y, seed=trial)
        scores.append(multiset_accuracy(recover_labels(grad_w, grad_b, size, method), y))
    return sum(scores) / len(scores)


@pytest.mark.parametrize("model_name", ["lenet", "cnn"])
def test_idlg_recovers_the_label_of_one_sample_exactly(patches, model_name):
    for i in range(0, len(patches.train_y), 41):  # 25 samples over all 8 classes, one fresh model each
        grad_w, grad_b = last_layer(model_name, patches.train_x[i:i + 1], patches.train_y[i:i + 1], seed=i)
        assert recover_labels(grad_w, grad_b, 1, "idlg").tolist() == [int(patches.train_y[i])]
        # The paper's rule, from the weight rows alone (features are >= 0 after sigmoid / ReLU).
        assert recover_labels(grad_w, None, 1, "idlg").tolist() == [int(patches.train_y[i])]


def test_yin_recovers_distinct_labels_exactly(patches):
    # Measured: 1.0 on the small ReLU CNN over 20 batches of 4 distinct labels (of 8 classes).
    assert mean_accuracy(patches, "cnn", 4, distinct=True, method="yin") == 1.0


def test_llg_recovers_repeated_labels_well_and_beats_yin(patches):
    # Labels drawn with repetition from 8 classes, 40 batches each. Measured with these seeds: CNN b = 4: LLG 0.956,
    # Yin (distinct labels only) 0.831; CNN b = 8: LLG 0.750; LeNet b = 8: LLG 0.828. Guessing uniformly at random
    # scores 0.357 (b = 4) and 0.504 (b = 8). LLG degrades as b approaches the number of classes: the offset
    # (1/M) sum_i |h_i| of every row is then as large as one sample's impact.
    llg4 = mean_accuracy(patches, "cnn", 4, distinct=False, method="llg", trials=40)
    yin4 = mean_accuracy(patches, "cnn", 4, distinct=False, method="yin", trials=40)
    assert llg4 >= 0.9
    assert llg4 > yin4 + 0.08
    assert mean_accuracy(patches, "cnn", 8, distinct=False, method="llg", trials=40) >= 0.7
    assert mean_accuracy(patches, "lenet", 8, distinct=False, method="llg", trials=40) >= 0.75


def test_llg_counts_a_label_homogeneous_batch(patches):
    # All 8 samples of one class: stage 1 finds the class, stage 2 must repeat it (Yin cannot).
    x = patches.train_x[patches.train_y == 3][:8]
    grad_w, grad_b = last_layer("cnn", x, torch.full((8,), 3), seed=0)
    assert llg_labels(grad_w, 8).tolist() == [3] * 8


def test_llg_is_exact_on_an_idealised_gradient():
    # Features of unit L1 norm and uniform predictions give row sums s_m = 1/M - k_m/b (k_m: count of class m), so
    # one sample's impact is -1/b; LLG's estimate (1 + 1/M) * (sum of negative s_m) / b is close enough to count
    # every class exactly.
    classes, features, labels = 50, 30, torch.tensor([4, 4, 4, 7, 9, 9, 20, 20])
    h = torch.rand(len(labels), features)
    h = h / h.sum(dim=1, keepdim=True)
    p = torch.full((len(labels), classes), 1.0 / classes)
    y = torch.nn.functional.one_hot(labels, classes).float()
    grad_w = (p - y).T @ h / len(labels)
    assert llg_labels(grad_w, len(labels)).tolist() == labels.tolist()


def test_the_last_linear_layer_is_found_by_tracing():
    assert find_last_linear(build_model({"name": "lenet"}, SHAPE, 8), SHAPE) == LastLinear("fc.weight", "fc.bias")
    assert find_last_linear(build_model({"name": "cnn"}, SHAPE, 8), SHAPE) == LastLinear(
        "classifier.3.weight", "classifier.3.bias")
    assert find_last_linear(build_model({"name": "resnet18"}, SHAPE, 8), SHAPE) == LastLinear("fc.weight", "fc.bias")
    no_linear = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(AttackNotApplicable):
        find_last_linear(no_linear, SHAPE)


def test_labels_attack_scores_labels_alone(patches):
    gen = torch.Generator().manual_seed(5)
    x, y = batch(patches, 4, distinct=True, gen=gen)
    model = build_model({"name": "cnn"}, SHAPE, 8, seed=3)
    update = {k: v.detach() for k, v in model_gradients(model, x, y, create_graph=False).items()}
    meta = TrainMeta("fedsgd", SHAPE, 8, patches.normalization, batch_size=4)
    attack = build_attack({"name": "labels", "method": "yin"})
    attack.check(model, meta)
    rec = attack.reconstruct(Observation(0, 0, model, update, meta))
    assert rec.inputs is None
    assert rec.labels.tolist() == sorted(y.tolist())
    with pytest.raises(AttackNotApplicable):
        attack.check(model, TrainMeta("fedsgd", SHAPE, 8))  # batch size not granted


def test_labels_from_a_fedavg_delta(patches):
    # Two local SGD steps on one batch of 4 distinct labels: -delta is a sum of two gradients, signs intact.
    gen = torch.Generator().manual_seed(2)
    x, y = batch(patches, 4, distinct=True, gen=gen)
    model = build_model({"name": "cnn"}, SHAPE, 8, seed=0)
    local = build_model({"name": "cnn"}, SHAPE, 8, seed=0)
    opt = torch.optim.SGD(local.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(local(x), y).backward()
        opt.step()
    delta = {k: (dict(local.named_parameters())[k] - p).detach() for k, p in model.named_parameters()}
    meta = TrainMeta("fedavg", SHAPE, 8, patches.normalization, batch_size=4, local_steps=2, num_examples=4)
    assert samples_in_update(meta) == 4
    rec = build_attack({"name": "labels", "method": "yin"}).reconstruct(Observation(0, 0, model, delta, meta))
    assert rec.labels.tolist() == sorted(y.tolist())
