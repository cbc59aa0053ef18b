"""The GI-SMN-style attack's generative prior: trained offline, cached with a checksum, loaded by the attack.

The paper uses a pre-trained StyleGAN-XL; fedsim trains a `MiniStyleGen` (`fedsim.attacks.generator`) itself, with no download:

* data: random 32x32 crops of an image pyramid of the bundled photographs in `AUXILIARY_PHOTOS` (never the victim
  photographs of `patches`), with flips and an optional colour augmentation, or a torchvision dataset the user
  already has on disk (`source=cifar10 root=...`);
* objective: the generator is the decoder of a VAE (Kingma & Welling 2014): an encoder q(z|x) = N(mu(x), sigma(x)^2)
  and the loss `sum_pixels |x - G(z)|^2 + beta KL(q(z|x) || N(0, I))` per image, z = mu + sigma eps. No
  discriminator: stable and deterministic on a CPU, at the price of blurrier samples than a GAN;
* cache: `<cache>/priors/gismn-v<GENERATOR_VERSION>-<source>-<config hash>.pt` next to a `.sha256` file, verified on
  every load; `<cache>` is `$FEDSIM_CACHE`, else `~/.cache/fedsim`.

Command line: `python -m fedsim.attacks.prior --source auxiliary --steps 600` (see `main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from fedsim.attacks.generator import GENERATOR_VERSION, PRIOR_SOURCES, GeneratorConfig, MiniStyleGen, build_generator
from fedsim.data import load_dataset
from fedsim.data.embedded import AUXILIARY_PHOTOS, PATCH_PHOTOS, load_photo, random_crops
from fedsim.errors import ConfigError, FedsimError

PRIOR_FORMAT = "fedsim-gismn-prior"
SOURCES = PRIOR_SOURCES


class PriorNotFound(FedsimError, FileNotFoundError):
    """No cached prior for this configuration; the message holds the command that builds it."""


class PriorCorrupt(FedsimError):
    """A cached prior fails its checksum or does not match the requested configuration."""


@dataclass(frozen=True)
class PriorConfig:
    """What the prior is trained on and how; together with `GENERATOR_VERSION` it names the cache file.

    `root` (where a torchvision source lives on this machine) is not part of the identity.
    """

    source: str = "auxiliary"           # "auxiliary" (bundled photographs) or a torchvision dataset on disk
    root: str | None = None             # torchvision root (None: fedsim's default, $FEDSIM_DATA)
    steps: int = 600                    # Adam steps (attack quality plateaus by ~600: docs/gismn.md)
    batch_size: int = 32                # crops per step
    lr: float = 2e-3                    # Adam learning rate, cosine-decayed to 0
    beta: float = 0.05                  # KL weight of the VAE objective
    crops: int = 20000                  # size of the training pool (auxiliary source)
    color_augment: bool = True          # random colour mixing of crops (most bundled photographs are grey)
    seed: int = 0                       # initialisation, crops, batches and reparameterisation noise
    generator: GeneratorConfig = GeneratorConfig()

    def identity(self) -> dict:
        """What determines the trained weights (what the cache name hashes): the architecture version, these fields
        but `root`, and for the auxiliary source the list of photographs."""
        values = dataclasses.asdict(self)
        values.pop("root")
        values["generator"]["channels"] = list(self.generator.channels)
        if self.source == "auxiliary":
            values["photos"] = list(AUXILIARY_PHOTOS)
        return {"generator_version": GENERATOR_VERSION, **values}

    def digest(self) -> str:
        """12 hex digits of SHA-256 over the canonical JSON of `identity()`."""
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def check(self) -> None:
        """Validate at the door: one-line ConfigError naming the key."""
        if self.source not in SOURCES:
            raise ConfigError("prior.source", self.source, "one of " + ", ".join(SOURCES))
        for key in ("steps", "batch_size", "crops"):
            if getattr(self, key) < 1:
                raise ConfigError(f"prior.{key}", getattr(self, key), "an integer >= 1")
        if not self.lr > 0 or self.beta < 0:
            raise ConfigError("prior.lr/beta", (self.lr, self.beta), "lr > 0 and beta >= 0")
        if self.generator.resolution != 32:
            raise ConfigError("prior.generator.channels", list(self.generator.channels),
                              "four resolutions (4, 8, 16, 32): the attack's generator output is 32x32")


@dataclass(frozen=True)
class TrainStats:
    """How a prior's training went. recon_psnr: dB of encoder->decoder reconstructions of held-out crops."""

    steps: int
    seconds: float
    final_loss: float         # mean of the last 100 steps' VAE loss per image
    recon_psnr: float
    sample_std: float         # pixel std over G(z), z ~ N(0, I): a collapsed decoder gives ~0


@dataclass
class Prior:
    """A trained generator ready for the attack: `generator` is in eval mode with frozen weights."""

    generator: MiniStyleGen
    config: PriorConfig
    stats: TrainStats
    path: Path | None = None


# --- cache ------------------------------------------------------------------------------------------------------

def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where priors live: `override`, else `$FEDSIM_CACHE/priors`, else `~/.cache/fedsim/priors`."""
    if override is not None:
        return Path(override).expanduser()
    root = os.environ.get("FEDSIM_CACHE") or "~/.cache/fedsim"
    return Path(root).expanduser() / "priors"


def prior_path(config: PriorConfig, cache: str | os.PathLike | None = None) -> Path:
    """The cache file of `config`: the architecture version and the training-config hash are in its name."""
    return cache_dir(cache) / f"gismn-v{GENERATOR_VERSION}-{config.source}-{config.digest()}.pt"


def build_command(config: PriorConfig, cache: str | os.PathLike | None = None) -> str:
    """The shell command that trains and caches the prior for `config`."""
    default = PriorConfig()
    parts = ["python -m fedsim.attacks.prior", f"--source {config.source}", f"--steps {config.steps}"]
    for name, flag in (("batch_size", "--batch-size"), ("lr", "--lr"), ("beta", "--beta"), ("crops", "--crops"),
                       ("seed", "--seed")):
        if getattr(config, name) != getattr(default, name):
            parts.append(f"{flag} {getattr(config, name)}")
    if config.color_augment != default.color_augment:
        parts.append("--no-color-augment" if not config.color_augment else "--color-augment")
    if config.generator != default.generator:
        parts.append("(non-default generator: build it with fedsim.attacks.prior.train_and_cache)")
    if config.root is not None:
        parts.append(f"--root {config.root}")
    if cache is not None:
        parts.append(f"--cache-dir {cache}")
    return " ".join(parts)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_prior(prior: Prior, path: Path) -> Path:
    """Write the prior and its `.sha256` file atomically (temporary files, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": PRIOR_FORMAT,
        "generator_version": GENERATOR_VERSION,
        "config_hash": prior.config.digest(),
        "identity": json.dumps(prior.config.identity(), sort_keys=True),
        "stats": json.dumps(dataclasses.asdict(prior.stats)),
        "state_dict": {k: v.detach().clone() for k, v in prior.generator.state_dict().items()},
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    digest = _sha256(tmp)
    tmp_sum = path.with_name(path.name + f".sha256.tmp{os.getpid()}")
    tmp_sum.write_text(f"{digest}  {path.name}\n")
    os.replace(tmp, path)
    os.replace(tmp_sum, path.with_name(path.name + ".sha256"))
    return path


def load_prior(config: PriorConfig, cache: str | os.PathLike | None = None) -> Prior:
    """Load the cached prior of `config`, verifying its SHA-256 and its recorded version and config hash.

    Raises PriorNotFound (no file) or PriorCorrupt (checksum missing or wrong, unreadable, other config), each a
    one-line message naming the path and the command that rebuilds it.
    """
    config.check()
    path = prior_path(config, cache)
    rebuild = build_command(config, cache) + " --force"
    if not path.exists():
        raise PriorNotFound(f"no GI-SMN prior at {path}; build it with: {build_command(config, cache)}")
    sum_path = path.with_name(path.name + ".sha256")
    if not sum_path.exists():
        raise PriorCorrupt(f"GI-SMN prior {path} has no checksum file {sum_path.name}; rebuild it with: {rebuild}")
    expected = sum_path.read_text().split()[0] if sum_path.read_text().strip() else ""
    if _sha256(path) != expected:
        raise PriorCorrupt(f"GI-SMN prior {path} fails its SHA-256 check (corrupt or modified); "
                           f"rebuild it with: {rebuild}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise PriorCorrupt(f"GI-SMN prior {path} cannot be read ({type(err).__name__}); rebuild it with: {rebuild}")
    if (not isinstance(payload, dict) or payload.get("format") != PRIOR_FORMAT
            or payload.get("generator_version") != GENERATOR_VERSION or payload.get("config_hash") != config.digest()):
        raise PriorCorrupt(f"GI-SMN prior {path} was built for another version or config; rebuild it with: {rebuild}")
    generator = MiniStyleGen(config.generator)
    try:
        generator.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise PriorCorrupt(f"GI-SMN prior {path} does not fit the generator ({str(err).splitlines()[0]}); "
                           f"rebuild it with: {rebuild}") from None
    stats = TrainStats(**json.loads(payload["stats"]))
    return Prior(_frozen(generator), config, stats, path)


def _frozen(generator: MiniStyleGen) -> MiniStyleGen:
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    return generator


def obtain_prior(config: PriorConfig, cache: str | os.PathLike | None = None, *, train_if_missing: bool = False,
                 progress: bool = True) -> Prior:
    """The cached prior of `config`; with `train_if_missing`, train and cache it first when there is none."""
    try:
        return load_prior(config, cache)
    except PriorNotFound:
        if not train_if_missing:
            raise
    return train_and_cache(config, cache, progress=progress)


def train_and_cache(config: PriorConfig, cache: str | os.PathLike | None = None, *, progress: bool = True) -> Prior:
    """Train the prior of `config` and write it (with its checksum) to the cache."""
    prior = train_prior(config, progress=progress)
    prior.path = save_prior(prior, prior_path(config, cache))
    return prior


# --- training data ----------------------------------------------------------------------------------------------

def training_images(config: PriorConfig, count: int, gen: torch.Generator) -> Tensor:
    """`count` training images (count, 3, 32, 32) float32 pixels in [0, 1] from `config.source`.

    auxiliary: `random_crops` of every photograph in AUXILIARY_PHOTOS (pyramid downscaling 1..8x, flips), equal
    shares per photograph. torchvision: the training split on disk, grey replicated to RGB, resized to 32x32.
    """
    size = config.generator.resolution
    if config.source == "auxiliary":
        overlap = set(AUXILIARY_PHOTOS) & set(PATCH_PHOTOS)
        if overlap:  # the prior must never see a victim photograph
            raise ConfigError("AUXILIARY_PHOTOS", sorted(overlap), "photographs disjoint from PATCH_PHOTOS")
        shares = [count // len(AUXILIARY_PHOTOS) + (i < count % len(AUXILIARY_PHOTOS))
                  for i in range(len(AUXILIARY_PHOTOS))]
        crops = [random_crops(_photo(name), n, size, gen) for name, n in zip(AUXILIARY_PHOTOS, shares) if n > 0]
        return torch.cat(crops)

    node = {"name": config.source} if config.root is None else {"name": config.source, "root": config.root}
    bundle = load_dataset(node)
    pixels = bundle.normalization.to_pixels(bundle.train_x).clamp(0, 1)
    pick = torch.randperm(len(pixels), generator=gen)[:count]
    pixels = pixels[pick]
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return pixels.clamp(0, 1).contiguous()


@functools.lru_cache(maxsize=16)
def _photo(name: str):
    """`load_photo`, decoded once per process (a few are megapixel JPEGs)."""
    return load_photo(name)


def color_augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random colour mixing of pixels (n, 3, h, w) in [0, 1] (half of the images are left unchanged).

    Each changed image gets `x' = a * (M x) + (1 - a) * lum(x)`-style mixing: a random channel permutation, a random
    per-channel gain in [0.6, 1.0] and a saturation factor in [0.5, 1.5] around the luma; the result is clipped to
    [0, 1]. Gives colour to grey photographs and varies the hue of colour ones.
    """
    n = x.shape[0]
    perm = torch.stack([torch.randperm(3, generator=gen) for _ in range(n)])          # (n, 3)
    mixed = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    gain = 0.6 + 0.4 * torch.rand(n, 3, 1, 1, generator=gen)
    mixed = mixed * gain
    luma = (mixed * torch.tensor([0.2125, 0.7154, 0.0721]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    saturation = 0.5 + torch.rand(n, 1, 1, 1, generator=gen)
    mixed = luma + saturation * (mixed - luma)
    keep = torch.rand(n, 1, 1, 1, generator=gen) < 0.5
    return torch.where(keep, x, mixed.clamp(0, 1))


# --- the VAE used to train the generator ------------------------------------------------------------------------

class Encoder(nn.Module):
    """q(z|x): three stride-2 4x4 convs (32/64/128, LeakyReLU 0.2), Linear -> (mu, log sigma^2), each (n, z_dim)."""

    def __init__(self, z_dim: int, resolution: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(32, 64, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(),
        )
        self.head = nn.Linear(128 * (resolution // 8) ** 2, 2 * z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.features(x * 2 - 1)).chunk(2, dim=1)
        return mu, logvar.clamp(-8.0, 4.0)


def vae_loss(x: Tensor, recon: Tensor, mu: Tensor, logvar: Tensor, beta: float) -> Tensor:
    """Negative ELBO per image (up to constants): sum of squared pixel errors + beta KL(N(mu, sigma^2) || N(0, I))."""
    rec = (recon - x).pow(2).flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
    return (rec + beta * kl).mean()


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB of pixels in [0, 1]: (n, ...) -> (n,)."""
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def train_prior(config: PriorConfig = PriorConfig(), *, progress: bool = True) -> Prior:
    """Train `MiniStyleGen` as a VAE decoder on `config.source`; deterministic for a given config (and thread count).

    A further crops/8 (at most 512) held-out images measure the reconstruction PSNR. Returns the frozen generator
    (with `w_avg` = mean of M(z) over 4096 draws) and its `TrainStats`.
    """
    config.check()
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    held_out = min(512, max(16, config.crops // 8))
    pool = training_images(config, config.crops + held_out, gen)
    pool = pool[torch.randperm(len(pool), generator=gen)]
    test, pool = pool[:held_out], pool[held_out:]
    generator = build_generator(config.generator, seed=config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        encoder = Encoder(config.generator.z_dim, config.generator.resolution)
    params = list(generator.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(0.5, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, config.steps) / config.steps)))
    generator.train()
    losses: list[float] = []
    with _progress(progress, config.steps, f"training GI-SMN prior ({config.source})") as advance:
        for _ in range(config.steps):
            batch = pool[torch.randint(len(pool), (config.batch_size,), generator=gen)]
            if config.color_augment:
                batch = color_augment(batch, gen)
            mu, logvar = encoder(batch)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
            loss = vae_loss(batch, generator(z), mu, logvar, config.beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            advance(losses[-1])
    generator.eval()
    with torch.no_grad():
        recon_psnr = float(psnr(generator(encoder(test)[0]), test).mean())
        ws = generator.mapping(torch.randn(4096, config.generator.z_dim, generator=gen))
        generator.w_avg.copy_(ws.mean(0))
        sample_std = float(generator(torch.randn(256, config.generator.z_dim, generator=gen)).std())
    tail = losses[-100:]
    stats = TrainStats(config.steps, time.perf_counter() - start, sum(tail) / len(tail), recon_psnr, sample_std)
    return Prior(_frozen(generator), config, stats)


class _progress:
    """A rich progress bar over `total` steps (or nothing when disabled); yields `advance(loss)`."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.enabled, self.total, self.description = enabled, total, description

    def __enter__(self):
        if not self.enabled:
            return lambda loss: None

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.1f}"), TimeRemainingColumn(), transient=False)
        self.bar.__enter__()
        task = self.bar.add_task(self.description, total=self.total, loss=float("nan"))
        return lambda loss: self.bar.update(task, advance=1, loss=loss)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


# --- command line -----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`python -m fedsim.attacks.prior [--source auxiliary] [--steps N] ...`: train and cache a GI-SMN prior."""
    default = PriorConfig()
    parser = argparse.ArgumentParser(prog="python -m fedsim.attacks.prior",
                                     description="Train and cache the generative prior of the gismn attack.")
    parser.add_argument("--source", default=default.source, choices=SOURCES,
                        help="auxiliary: bundled photographs disjoint from the victims; else a torchvision dataset")
    parser.add_argument("--root", default=None, help="directory of the torchvision dataset (default $FEDSIM_DATA)")
    parser.add_argument("--steps", type=int, default=default.steps, help="Adam steps")
    parser.add_argument("--batch-size", type=int, default=default.batch_size)
    parser.add_argument("--lr", type=float, default=default.lr)
    parser.add_argument("--beta", type=float, default=default.beta, help="KL weight of the VAE objective")
    parser.add_argument("--crops", type=int, default=default.crops, help="training pool size (auxiliary source)")
    parser.add_argument("--color-augment", dest="color_augment", action="store_true", default=default.color_augment)
    parser.add_argument("--no-color-augment", dest="color_augment", action="store_false")
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--cache-dir", default=None, help="default $FEDSIM_CACHE/priors or ~/.cache/fedsim/priors")
    parser.add_argument("--force", action="store_true", help="retrain even when a valid cached prior exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    config = PriorConfig(source=args.source, root=args.root, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         beta=args.beta, crops=args.crops, color_augment=args.color_augment, seed=args.seed)
    try:
        config.check()
        if not args.force:
            try:
                prior = load_prior(config, args.cache_dir)
                print(f"prior already cached and verified: {prior.path} (use --force to retrain)")
                return 0
            except (PriorNotFound, PriorCorrupt):
                pass
        prior = train_and_cache(config, args.cache_dir, progress=not args.quiet)
    except FedsimError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    s = prior.stats
    print(f"wrote {prior.path}: {s.steps} steps in {s.seconds:.0f} s, held-out reconstruction PSNR "
          f"{s.recon_psnr:.2f} dB, sample std {s.sample_std:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
