"""Embedded datasets: real data shipped inside scikit-learn and scikit-image, no download.

- `digits`: scikit-learn's 1,797 handwritten digits, 8x8 grey, 10 classes.
- `patches`: natural-image crops cut from photographs shipped in scikit-image and scikit-learn; the label is the
  source photograph. Size 8..224, 1 or 3 channels.
- `synthetic`: Gaussian vectors labelled by a random linear teacher (tabular-style data).

`AUXILIARY_PHOTOS` are bundled photographs that `patches` never uses: generative priors train on them only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.data import DataBundle, channel_stats, normalize_images, register_dataset, stratified_split
from fedsim.errors import ConfigError
from fedsim.schema import knob
from fedsim.threat import Normalization

# Victim photographs (the classes of `patches`), all RGB.
PATCH_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "china", "flower", "immunohistochemistry", "motorcycle_left")
# Bundled photographs disjoint from PATCH_PHOTOS, for auxiliary (attacker-side) priors. Not here: skimage's `cat`
# (pixel-identical to `chelsea`) and `motorcycle_right` (the stereo twin of `motorcycle_left`).
AUXILIARY_PHOTOS = ("hubble_deep_field", "retina", "colorwheel", "grace_hopper", "camera", "brick", "grass",
                    "gravel", "coins", "moon", "clock", "cell")
_SKLEARN_PHOTOS = ("china", "flower")
_MATPLOTLIB_PHOTOS = ("grace_hopper",)


def load_photo(name: str) -> np.ndarray:
    """A bundled photograph as float32 (H, W, 3) in [0, 1]."""
    if name in _SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image  # heavy: scikit-learn loads only for its embedded dataset

        img = load_sample_image(f"{name}.jpg")
    elif name in _MATPLOTLIB_PHOTOS:
        from matplotlib.cbook import get_sample_data  # heavy: matplotlib loads only when a figure is drawn
        from PIL import Image  # heavy: Pillow loads only to read images

        with get_sample_data(f"{name}.jpg") as handle:
            img = np.asarray(Image.open(handle).convert("RGB"))
    else:
        import skimage.data  # heavy: scikit-image loads only for its embedded photographs

        if name == "motorcycle_left":
            img = skimage.data.stereo_motorcycle()[0]
        elif name == "motorcycle_right":
            img = skimage.data.stereo_motorcycle()[1]
        else:
            fn = getattr(skimage.data, name, None)
            if fn is None:
                raise ConfigError("data.sources", name, "a photograph bundled with scikit-image, scikit-learn or matplotlib")
            img = fn()
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.float32)
    img = img.astype(np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def random_crops(photo: np.ndarray, count: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """`count` random size x size crops from an image pyramid of `photo` (area downscaling by 1..8), with flips.

    Returns (count, 3, size, size) float32 pixels in [0, 1].
    """
    img = torch.from_numpy(photo).permute(2, 0, 1)[None]  # (1, 3, H, W)
    short = min(img.shape[-2:])
    if short < size:
        raise ConfigError("data.size", size, f"at most {short} (the smallest source photograph)")
    pyramid = []
    for factor in (1, 2, 3, 4, 6, 8):
        if short // factor < size:
            break
        level = img if factor == 1 else F.interpolate(img, scale_factor=1 / factor, mode="area")
        pyramid.append(level[0])
    # Favour coarse levels: a crop of a downscaled photo shows a recognisable object, not a texture.
    weights = torch.arange(1, len(pyramid) + 1, dtype=torch.float64)
    levels = torch.multinomial(weights, count, replacement=True, generator=gen)
    crops = torch.empty(count, 3, size, size)
    for i, lvl in enumerate(levels.tolist()):
        level = pyramid[lvl]
        top = int(torch.randint(0, level.shape[1] - size + 1, (1,), generator=gen))
        left = int(torch.randint(0, level.shape[2] - size + 1, (1,), generator=gen))
        crop = level[:, top:top + size, left:left + size]
        if bool(torch.rand(1, generator=gen) < 0.5):
            crop = crop.flip(-1)
        crops[i] = crop
    return crops.clamp_(0.0, 1.0)


def _to_gray(pixels: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.2125, 0.7154, 0.0721]).view(1, 3, 1, 1)  # ITU-R 709 luma, as skimage.rgb2gray
    return (pixels * weights).sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class DigitsConfig:
    test_fraction: float = knob(0.2, gt=0.0, lt=1.0, help="share of each class held out for server evaluation")
    seed: int = knob(0, help="seed of the train/test split")


@register_dataset("digits", DigitsConfig)
def load_digits(cfg: DigitsConfig) -> DataBundle:
    from sklearn.datasets import load_digits as sk_digits  # heavy: scikit-learn loads only for its embedded dataset

    raw = sk_digits()
    pixels = torch.from_numpy(raw.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8)
    y = torch.from_numpy(raw.target.astype(np.int64))
    train, test = stratified_split(y, cfg.test_fraction, cfg.seed)
    norm = channel_stats(pixels[train])
    x = normalize_images(pixels, norm)
    return DataBundle("digits", x[train], y[train], x[test], y[test], 10, norm, "image",
                      tuple(str(i) for i in range(10)))


@dataclass(frozen=True)
class PatchesConfig:
    size: int = knob(32, ge=8, le=224, help="crop side in pixels")
    channels: int = knob(3, choices=(1, 3), help="1 = grey, 3 = RGB")
    per_class: int = knob(160, ge=2, help="crops per source photograph")
    sources: tuple[str, ...] = knob(PATCH_PHOTOS, help="bundled photographs; one class each")
    test_fraction: float = knob(0.2, gt=0.0, lt=1.0)
    seed: int = knob(0, help="seed of the crops and of the train/test split")


@register_dataset("patches", PatchesConfig)
def load_patches(cfg: PatchesConfig) -> DataBundle:
    if len(cfg.sources) < 2:
        raise ConfigError("data.sources", list(cfg.sources), "at least two photographs (one class each)")
    gen = torch.Generator().manual_seed(cfg.seed)
    crops, labels = [], []
    for label, name in enumerate(cfg.sources):
        crops.append(random_crops(load_photo(name), cfg.per_class, cfg.size, gen))
        labels.append(torch.full((cfg.per_class,), label, dtype=torch.int64))
    pixels, y = torch.cat(crops), torch.cat(labels)
    if cfg.channels == 1:
        pixels = _to_gray(pixels)
    train, test = stratified_split(y, cfg.test_fraction, cfg.seed)
    norm = channel_stats(pixels[train])
    x = normalize_images(pixels, norm)
    return DataBundle("patches", x[train], y[train], x[test], y[test], len(cfg.sources), norm, "image",
                      tuple(cfg.sources))


@dataclass(frozen=True)
class SyntheticConfig:
    dim: int = knob(64, ge=2, help="vector dimension")
    classes: int = knob(10, ge=2)
    train_size: int = knob(2000, ge=10)
    test_size: int = knob(500, ge=10)
    seed: int = knob(0)


@register_dataset("synthetic", SyntheticConfig)
def load_synthetic(cfg: SyntheticConfig) -> DataBundle:
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.train_size + cfg.test_size
    x = torch.randn(n, cfg.dim, generator=gen)
    teacher = torch.randn(cfg.dim, cfg.classes, generator=gen)
    y = (x @ teacher).argmax(dim=1)
    return DataBundle("synthetic", x[:cfg.train_size], y[:cfg.train_size], x[cfg.train_size:], y[cfg.train_size:],
                      cfg.classes, Normalization(), "vector", tuple(str(i) for i in range(cfg.classes)))
