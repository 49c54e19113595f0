"""EDSR-style super-resolution networks (Lim et al. 2017): residual blocks without BatchNorm, a global
skip over the body, and pixel-shuffle upsampling. Sized by the model spec, e.g. `edsr:blocks=16,feats=64`
(EDSR-baseline, ~1.4M parameters at x2) or `edsr:blocks=4,feats=16` (the CPU student); the task `sr`
adds `scale=` from `sr.scale`, so the saved model's name rebuilds it exactly.

Input and output are RGB in [0, 1] (output not clamped: the metrics clamp and quantize). The body's
blocks are `body.0` ... `body.{blocks-1}`, the module paths the feature-distillation methods tap.

`skip=bicubic` (not EDSR's; VDSR's idea) adds the bicubic upsampling of the input to the output and starts
the last conv at zero, so the network starts as bicubic interpolation and learns only the residual detail.
EDSR learns the whole image through the pixel shuffle, which takes thousands of steps to reach bicubic
quality; the CPU configs train a few hundred steps, so they use the skip (`skip=none` is EDSR's).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cqd.models.factory import MODELS

# DIV2K's RGB mean (EDSR's MeanShift), subtracted from the input and added back to the output.
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResBlock(nn.Module):
    """conv-ReLU-conv, scaled by `res_scale`, plus the input (no BatchNorm: EDSR's finding for SR)."""

    def __init__(self, feats: int, res_scale: float):
        super().__init__()
        self.body = nn.Sequential(_conv(feats, feats), nn.ReLU(inplace=True), _conv(feats, feats))
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) * self.res_scale


def upsampler(scale: int, feats: int) -> nn.Sequential:
    """x2 and x3: one conv to feats * s^2 channels and a pixel shuffle; x4: two x2 stages (EDSR's)."""
    if scale in (2, 3):
        return nn.Sequential(_conv(feats, feats * scale * scale), nn.PixelShuffle(scale))
    if scale == 4:
        return nn.Sequential(_conv(feats, feats * 4), nn.PixelShuffle(2), _conv(feats, feats * 4), nn.PixelShuffle(2))
    raise ValueError(f"edsr: scale must be 2, 3 or 4, got {scale}")


class EDSR(nn.Module):
    def __init__(self, out_chans: int = 3, in_chans: int = 3, blocks: int = 16, feats: int = 64, scale: int = 2,
                 res_scale: float = 1.0, skip: str = "none"):
        super().__init__()
        if blocks < 1 or feats < 1:
            raise ValueError(f"edsr: blocks and feats must be at least 1, got blocks={blocks}, feats={feats}")
        if skip not in ("none", "bicubic"):
            raise ValueError(f"edsr: skip must be 'none' (EDSR's) or 'bicubic', got {skip!r}")
        if skip == "bicubic" and out_chans != in_chans:
            raise ValueError("edsr: skip=bicubic adds the upsampled input to the output, so it needs as many output "
                             f"channels as input channels ({out_chans} != {in_chans})")
        self.scale, self.skip = scale, skip
        mean = DIV2K_MEAN if in_chans == 3 else (0.5,) * in_chans
        self.register_buffer("mean_in", _column(mean, in_chans), persistent=False)
        self.register_buffer("mean_out", _column(mean if out_chans == in_chans else (0.5,) * out_chans, out_chans),
                             persistent=False)
        self.head = _conv(in_chans, feats)
        self.body = nn.Sequential(*(ResBlock(feats, res_scale) for _ in range(blocks)))
        self.body_end = _conv(feats, feats)
        self.tail = nn.Sequential(upsampler(scale, feats), _conv(feats, out_chans))
        if skip == "bicubic":  # starts as bicubic upsampling: the last conv begins at zero
            nn.init.zeros_(self.tail[-1].weight)
            nn.init.zeros_(self.tail[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.head(x - self.mean_in)
        h = h + self.body_end(self.body(h))
        if self.skip == "bicubic":
            return self.tail(h) + F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return self.tail(h) + self.mean_out


def _column(values, n: int):
    import torch

    return torch.tensor(values[:n], dtype=torch.float32).view(1, n, 1, 1)


@MODELS.register("edsr")
def edsr(num_classes: int, in_chans: int = 3, blocks: int = 16, feats: int = 64, scale: int = 2,
         res_scale: float = 1.0, skip: str = "none") -> EDSR:
    """`num_classes` is the number of output channels for an image-to-image model (3: RGB)."""
    return EDSR(num_classes, in_chans, blocks, feats, scale, res_scale, skip)
