"""The style-based generator GI-SMN searches through (`MiniStyleGen`, a small StyleGAN2-like network): built here,
trained offline as a prior by `fedsim.attacks.prior`, searched by `fedsim.attacks.gismn`. Both import it; neither imports the
other's internals for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.errors import ConfigError

# Bumped whenever MiniStyleGen's architecture or parameter layout changes: cached priors carry it in their name.
GENERATOR_VERSION = 1
GENERATOR_RESOLUTION = 32
_LUMA = (0.2125, 0.7154, 0.0721)  # ITU-R 709, as fedsim.data.embedded turns patches grey
# What a prior can be trained on: bundled photographs disjoint from the victims, or a torchvision set on disk.
PRIOR_SOURCES = ("auxiliary", "cifar10", "cifar100", "mnist", "fashion_mnist")


# --- the generator ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of `MiniStyleGen` (part of a cached prior's identity)."""

    z_dim: int = 64                                 # latent z in R^{z_dim}, z ~ N(0, I)
    w_dim: int = 128                                # style vectors w in R^{w_dim}
    mapping_layers: int = 4                         # Linear + LeakyReLU layers of the mapping network
    channels: tuple[int, ...] = (128, 96, 64, 32)   # feature channels at 4x4, 8x8, 16x16, 32x32

    @property
    def resolution(self) -> int:
        return 4 * 2 ** (len(self.channels) - 1)

    @property
    def num_ws(self) -> int:
        """Style vectors one image uses (W+ has num_ws x w_dim numbers): per resolution 1-2 convs and a toRGB."""
        return 2 + 3 * (len(self.channels) - 1)


class MappingNetwork(nn.Module):
    """z (n, z_dim) -> w (n, w_dim): pixel norm, then `mapping_layers` x (Linear, LeakyReLU 0.2) (StyleGAN's M)."""

    def __init__(self, z_dim: int, w_dim: int, layers: int) -> None:
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.net = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.LeakyReLU(0.2))])

    def forward(self, z: Tensor) -> Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        return self.net(z)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution (Karras et al. 2020, eqs. 1-3), with an optional bilinear x2 upsampling.

    The style `s = A(w)` scales the input channels (`w'_ijk = s_i w_ijk`, eq. 1) and, with `demodulate`, every
    output channel is divided by `sqrt(sum_ik w'_ijk^2 + 1e-8)` (eq. 3). Scaling the input instead of the weight is
    the same map and avoids a grouped convolution. Weights use the equalised learning rate (runtime scale
    1/sqrt(fan_in)).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, w_dim: int, *, demodulate: bool = True,
                 upsample: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.affine = nn.Linear(w_dim, in_channels)
        nn.init.normal_(self.affine.weight, std=1.0 / math.sqrt(w_dim))
        nn.init.ones_(self.affine.bias)  # styles start at 1: an unmodulated convolution
        self.scale = 1.0 / math.sqrt(in_channels * kernel * kernel)
        self.padding = kernel // 2
        self.demodulate = demodulate
        self.upsample = upsample

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        """x: (n, in, h, w) features; w: (n, w_dim) style -> (n, out, h', w'), h' = 2h with `upsample`."""
        style = self.affine(w)                                    # (n, in)
        weight = self.weight * self.scale
        x = x * style[:, :, None, None]
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        y = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # sum_{i,k} (s_i w_ijk)^2 = (sum_k w_ijk^2) . s_i^2
            demod = torch.rsqrt(style.pow(2) @ weight.pow(2).sum(dim=(2, 3)).t() + 1e-8)  # (n, out)
            y = y * demod[:, :, None, None]
        return y + self.bias[None, :, None, None]


class MiniStyleGen(nn.Module):
    """A small StyleGAN2-like generator with skip toRGB outputs: z -> w -> W+ -> image in [0, 1].

    Synthesis: a learned constant (C0, 4, 4); at 4x4 one modulated 3x3 conv; at every further resolution an
    upsampling modulated 3x3 conv and a modulated 3x3 conv (LeakyReLU 0.2 after each); at every resolution a
    modulated 1x1 toRGB without demodulation whose output is upsampled and summed (StyleGAN2's skip generator);
    a sigmoid maps the sum to pixels. Every layer reads its own style vector, so W+ is (num_ws, w_dim) per image.
    """

    def __init__(self, config: GeneratorConfig = GeneratorConfig()) -> None:
        super().__init__()
        if len(config.channels) < 2:
            raise ConfigError("generator.channels", list(config.channels), "at least two resolutions (4x4 and 8x8)")
        self.config = config
        c = config.channels
        self.mapping = MappingNetwork(config.z_dim, config.w_dim, config.mapping_layers)
        self.const = nn.Parameter(torch.randn(c[0], 4, 4))
        self.convs = nn.ModuleList([ModulatedConv2d(c[0], c[0], 3, config.w_dim)])
        self.to_rgb = nn.ModuleList([ModulatedConv2d(c[0], 3, 1, config.w_dim, demodulate=False)])
        for prev, cur in zip(c, c[1:]):
            self.convs.append(ModulatedConv2d(prev, cur, 3, config.w_dim, upsample=True))
            self.convs.append(ModulatedConv2d(cur, cur, 3, config.w_dim))
            self.to_rgb.append(ModulatedConv2d(cur, 3, 1, config.w_dim, demodulate=False))
        # Mean style over many z (set when the prior is trained): the centre of W, for truncation and init.
        self.register_buffer("w_avg", torch.zeros(config.w_dim))

    @property
    def num_ws(self) -> int:
        return self.config.num_ws

    def styles(self, z: Tensor) -> Tensor:
        """z: (n, z_dim) -> W+ (n, num_ws, w_dim), every layer given the same w = M(z)."""
        return self.mapping(z)[:, None, :].expand(-1, self.num_ws, -1)

    def synthesis(self, ws: Tensor) -> Tensor:
        """W+ (n, num_ws, w_dim) -> images (n, 3, res, res) in [0, 1]."""
        n = ws.shape[0]
        x = self.const[None].expand(n, -1, -1, -1)
        act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
        x = act(self.convs[0](x, ws[:, 0]))
        rgb = self.to_rgb[0](x, ws[:, 1])
        index = 2
        for level in range(1, len(self.to_rgb)):
            x = act(self.convs[2 * level - 1](x, ws[:, index]))
            x = act(self.convs[2 * level](x, ws[:, index + 1]))
            rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False)
            rgb = rgb + self.to_rgb[level](x, ws[:, index + 2])
            index += 3
        return torch.sigmoid(rgb)

    def forward(self, z: Tensor) -> Tensor:
        """z: (n, z_dim) -> images (n, 3, res, res) in [0, 1]."""
        return self.synthesis(self.styles(z))


def build_generator(config: GeneratorConfig = GeneratorConfig(), seed: int = 0) -> MiniStyleGen:
    """A freshly initialised generator, the same for the same seed (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MiniStyleGen(config)
