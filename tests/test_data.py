import numpy as np
import pytest
import torch

from fedsim.data import load_dataset
from fedsim.data.embedded import AUXILIARY_PHOTOS, PATCH_PHOTOS
from fedsim.data.partition import PartitionConfig, partition
from fedsim.errors import ConfigError, DatasetNotFound


def test_digits_are_the_sklearn_digits_normalised_with_their_own_statistics():
    bundle = load_dataset({"name": "digits"})
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    assert len(bundle.train_x) + len(bundle.test_x) == 1797
    pixels = bundle.normalization.to_pixels(bundle.train_x)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert abs(float(bundle.train_x.mean())) < 1e-4 and abs(float(bundle.train_x.std()) - 1) < 0.01
    # every class keeps about 20 % for the server's test set
    for c in range(10):
        n_test, n_all = int((bundle.test_y == c).sum()), int((bundle.train_y == c).sum() + (bundle.test_y == c).sum())
        assert abs(n_test / n_all - 0.2) < 0.02


@pytest.mark.parametrize("size,channels", [(8, 1), (32, 3), (64, 3)])
def test_patches_take_size_and_channels_and_label_the_source_photo(size, channels):
    bundle = load_dataset({"name": "patches", "size": size, "channels": channels, "per_class": 20})
    assert bundle.input_shape == (channels, size, size)
    assert bundle.num_classes == len(PATCH_PHOTOS) == len(bundle.class_names)
    counts = torch.bincount(torch.cat([bundle.train_y, bundle.test_y]))
    assert counts.tolist() == [20] * len(PATCH_PHOTOS)
    pixels = bundle.normalization.to_pixels(bundle.train_x)
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5
    # natural images, not noise: neighbouring pixels are strongly correlated
    px = pixels.flatten(0, 1)
    corr = torch.corrcoef(torch.stack([px[:, :, :-1].flatten(), px[:, :, 1:].flatten()]))[0, 1]
    assert corr > 0.8


def test_patches_are_deterministic_and_auxiliary_photos_are_disjoint():
    a = load_dataset({"name": "patches", "per_class": 10, "seed": 3})
    b = load_dataset({"name": "patches", "per_class": 10, "seed": 3, "test_fraction": 0.2000001})
    assert torch.equal(a.train_x, b.train_x)
    assert not set(PATCH_PHOTOS) & set(AUXILIARY_PHOTOS)


def test_synthetic_vectors_are_learnable_by_their_teacher():
    bundle = load_dataset({"name": "synthetic", "dim": 16, "classes": 4})
    assert bundle.kind == "vector" and bundle.input_shape == (16,)
    assert len(torch.unique(bundle.train_y)) == 4


def test_bad_dataset_values_name_the_key():
    with pytest.raises(ConfigError, match=r"data.size=4 .*>= 8"):
        load_dataset({"name": "patches", "size": 4})
    with pytest.raises(ConfigError, match=r"data.name='mnst' .*mnist"):
        load_dataset({"name": "mnst"})


def test_missing_torchvision_dataset_is_one_line_naming_the_path(tmp_path):
    with pytest.raises(DatasetNotFound) as err:
        load_dataset({"name": "cifar10", "root": str(tmp_path / "nowhere")})
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and "\n" not in message and "download=true" in message


def test_imagefolder_reads_class_directories(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    bundle = load_dataset({"name": "imagefolder", "root": str(tmp_path), "size": 16, "test_fraction": 0.2})
    assert bundle.class_names == ("cats", "dogs") and bundle.input_shape == (3, 16, 16)
    assert len(bundle.train_x) == 8 and len(bundle.test_x) == 2


def _labels(n=600, classes=6, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, classes, n))


def test_iid_partition_covers_everything_once_in_equal_shares():
    labels = _labels()
    parts = partition(labels, 5, PartitionConfig(scheme="iid"), seed=1)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(600))
    assert [len(p) for p in parts] == [120] * 5
    again = partition(labels, 5, PartitionConfig(scheme="iid"), seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(labels, 5, PartitionConfig(scheme="iid"), seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_partition_skews_labels_more_for_small_alpha():
    labels = _labels(3000)

    def skew(alpha):
        parts = partition(labels, 6, PartitionConfig(scheme="dirichlet", alpha=alpha), seed=0)
        shares = [np.bincount(labels[p].numpy(), minlength=6) / len(p) for p in parts]
        return float(np.mean([s.max() for s in shares]))

    assert skew(0.1) > skew(100.0) + 0.2


def test_pathological_partition_gives_each_client_few_classes():
    labels = _labels(1200)
    parts = partition(labels, 6, PartitionConfig(scheme="pathological", classes_per_client=2), seed=0)
    assert all(len(set(labels[p].tolist())) <= 2 for p in parts)
