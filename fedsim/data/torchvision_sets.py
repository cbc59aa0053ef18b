"""torchvision datasets read from a local root. Nothing is downloaded unless `data.download=true`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedsim.data import DataBundle, channel_stats, normalize_images, register_dataset, stratified_split
from fedsim.errors import DatasetNotFound, DatasetUnreadable
from fedsim.schema import knob
from fedsim.threat import Normalization

DEFAULT_ROOT = os.environ.get("FEDSIM_DATA", "~/.cache/fedsim/data")


@dataclass(frozen=True)
class TorchvisionConfig:
    root: str = knob(DEFAULT_ROOT, help="directory holding the dataset (env FEDSIM_DATA sets the default)")
    download: bool = knob(False, help="download into root when missing (needs network)")
    max_train: int | None = knob(None, ge=1, help="keep the first N training samples (None: all)")
    max_test: int | None = knob(None, ge=1, help="keep the first N test samples (None: all)")


@dataclass(frozen=True)
class ImageFolderConfig:
    root: str = knob(help="directory with one sub-directory of images per class")
    size: int = knob(32, ge=8, le=512, help="images are resized to size x size")
    channels: int = knob(3, choices=(1, 3))
    test_fraction: float = knob(0.2, gt=0.0, lt=1.0)
    seed: int = knob(0)


# name -> (torchvision class name, channels, published normalisation or None)
_SETS = {
    "mnist": ("MNIST", 1, ((0.1307,), (0.3081,))),
    "fashion_mnist": ("FashionMNIST", 1, ((0.2860,), (0.3530,))),
    "cifar10": ("CIFAR10", 3, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    "cifar100": ("CIFAR100", 3, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
}


def _root(root: str) -> Path:
    return Path(os.path.expanduser(root)).resolve()


def _torchvision_split(name: str, cfg: TorchvisionConfig, train: bool):
    import torchvision.datasets as tvd  # heavy: torchvision's datasets and models load only when used

    cls_name = _SETS[name][0]
    root = _root(cfg.root)
    try:
        return getattr(tvd, cls_name)(str(root), train=train, download=cfg.download)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        raise DatasetNotFound(
            f"{name} not found under {root}: put torchvision's {cls_name} files there, or run once with "
            f"data.download=true on a machine with network, or set data.root / FEDSIM_DATA"
        ) from None


def _pixels(data) -> torch.Tensor:
    arr = np.asarray(data.data if not isinstance(data.data, torch.Tensor) else data.data.numpy())
    t = torch.from_numpy(arr).float() / 255.0
    return t[:, None] if t.dim() == 3 else t.permute(0, 3, 1, 2)  # (N, C, H, W)


def _make_loader(name: str):
    def load(cfg: TorchvisionConfig) -> DataBundle:
        try:
            train, test = _torchvision_split(name, cfg, True), _torchvision_split(name, cfg, False)
        except DatasetNotFound:
            raise
        except Exception as err:  # files present but unreadable
            raise DatasetUnreadable(f"{name} under {_root(cfg.root)} could not be read ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''}); remove it and fetch it "
                                    "again with data.download=true") from None
        x_train, x_test = _pixels(train)[: cfg.max_train], _pixels(test)[: cfg.max_test]
        y_train = torch.as_tensor(np.asarray(train.targets), dtype=torch.int64)[: cfg.max_train]
        y_test = torch.as_tensor(np.asarray(test.targets), dtype=torch.int64)[: cfg.max_test]

        norm = Normalization(*_SETS[name][2])
        return DataBundle(name, normalize_images(x_train, norm), y_train, normalize_images(x_test, norm), y_test,
                          len(train.classes), norm, "image", tuple(str(c) for c in train.classes))

    return load


for _name in _SETS:
    register_dataset(_name, TorchvisionConfig)(_make_loader(_name))


@register_dataset("imagefolder", ImageFolderConfig)
def load_imagefolder(cfg: ImageFolderConfig) -> DataBundle:
    import torchvision.datasets as tvd  # heavy: torchvision's datasets and models load only when used
    from PIL import Image  # heavy: Pillow loads only to read images

    root = _root(cfg.root)
    if not root.is_dir():
        raise DatasetNotFound(f"imagefolder root {root} does not exist; set data.root to a directory with one "
                              "sub-directory of images per class")
    folder = tvd.ImageFolder(str(root))
    if not folder.samples:
        raise DatasetNotFound(f"imagefolder root {root} holds no images in class sub-directories")
    images = []
    for path, _ in folder.samples:
        with Image.open(path) as img:
            img = img.convert("L" if cfg.channels == 1 else "RGB")
            img = img.resize((cfg.size, cfg.size), Image.Resampling.BOX if min(img.size) >= cfg.size
                             else Image.Resampling.BILINEAR)
            arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        images.append(arr[None, None] if arr.dim() == 2 else arr.permute(2, 0, 1)[None])
    pixels = torch.cat(images).clamp(0, 1)
    y = torch.tensor([label for _, label in folder.samples], dtype=torch.int64)
    train, test = stratified_split(y, cfg.test_fraction, cfg.seed)
    norm = channel_stats(pixels[train])
    x = normalize_images(pixels, norm)
    return DataBundle("imagefolder", x[train], y[train], x[test], y[test], len(folder.classes), norm, "image",
                      tuple(folder.classes))
