"""LSFD: local-selective feature distillation for super-resolution (Park and Kwak, arXiv 2111.10988).

The paper's abstract gives two ideas and no formulas (no public code): (1) distill *local* feature
information instead of whole maps, as FitNet does; (2) weight the pixel locations by a soft attention
computed from the teacher-student feature difference, so the student attends where it differs most.
Our formulas, each choice a key of `method.lsfd`:

  fs = r(F_s) (a trained 1x1 conv to the teacher's channels), ft = F_t, both (B, C, H, W).

  Local distance (norm: local, the default). For each location p, take the k x k window W(p)
  (`window`, 3) over all channels, and standardize each map by that window's own mean and std:
      a(q; p) = (f(q) - mean_W(p) f) / sqrt(var_W(p) f + eps)     for q in W(p)
      d(p)    = mean over q in W(p) and channels of (a_s(q; p) - a_t(q; p))^2
  which equals 2 - 2 * (local correlation of fs and ft over W(p)) up to eps, lies in [0, 4], and is
  computed with five stride-1 average pools (no unfold). Why: an SR student with a quarter of the
  teacher's channels cannot match the teacher's activations' absolute offsets and scale everywhere;
  FitNet's whole-map MSE is dominated by them (smooth regions with large activations), while the
  upsampler needs the local structure (edges, textures), which a per-window standardization keeps.
  `norm: none` keeps absolute values: d(p) = mean over W(p) and channels of (fs - ft)^2, a windowed MSE.

  Selective attention. Per image, w(p) = H W * softmax_p(d(p) / (tau * mean_p d(p))), detached
  (`detach_attention`): a weight with mean 1 that grows with the difference; dividing by the image's
  mean difference makes `tau` (1.0) scale-free: tau -> infinity gives uniform weights (plain local
  distillation), a small tau puts the weight on the few worst locations. Detached, because the
  weights should pick locations, not be minimized themselves (a student could otherwise lower the
  loss by evening out its errors rather than reducing them).

  loss = L1(g(z), y) + beta * mean over tapped pairs of mean_p w(p) d(p).

Layers as `sr_fitnet`'s (evenly spaced body blocks by default).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from cqd.methods import METHODS
from cqd.methods.sr import FeatureDistiller, FeatureParams


class LSFDParams(FeatureParams):
    window: int = Field(3, ge=1, description="side k of the local window (odd: centred on p)")
    tau: float = Field(1.0, gt=0, description="attention temperature, relative to the image's mean difference")
    norm: Literal["local", "none"] = Field("local", description="local: standardize by each window's mean and std; "
                                                                "none: windowed MSE")
    eps: float = Field(1e-4, gt=0, description="added to the local variances")
    detach_attention: bool = Field(True, description="the attention weights pass no gradient")

    @field_validator("window")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"the window must be odd so that it is centred on its location, e.g. {v + 1}")
        return v


def _pool(t: Tensor, k: int) -> Tensor:
    return F.avg_pool2d(t, k, stride=1, padding=k // 2, count_include_pad=False)


def local_distance(fs: Tensor, ft: Tensor, window: int, norm: str = "local", eps: float = 1e-4) -> Tensor:
    """d(p), (B, 1, H, W): the mean squared difference over the window at p of the two maps, each
    standardized by that window's mean and variance (norm 'local') or as they are ('none')."""
    if norm == "none":
        return _pool((fs - ft).pow(2).mean(1, keepdim=True), window)
    m = lambda t: _pool(t.mean(1, keepdim=True), window)  # noqa: E731  (mean over the window and the channels)
    mu_s, mu_t = m(fs), m(ft)
    var_s = (m(fs * fs) - mu_s ** 2).clamp_min(0) + eps
    var_t = (m(ft * ft) - mu_t ** 2).clamp_min(0) + eps
    cov = m(fs * ft) - mu_s * mu_t
    return ((var_s - eps) / var_s + (var_t - eps) / var_t - 2 * cov / (var_s * var_t).sqrt()).clamp_min(0)


def attention(d: Tensor, tau: float) -> Tensor:
    """w(p) = H W softmax_p(d(p) / (tau mean_p d)), per image: mean 1, larger where d is larger."""
    b, _, h, w = d.shape
    flat = d.reshape(b, -1)
    scaled = flat / (tau * flat.mean(1, keepdim=True).clamp_min(1e-12))
    return (torch.softmax(scaled, dim=1) * (h * w)).view_as(d)


@METHODS.register("lsfd")
class LSFD(FeatureDistiller):
    Params = LSFDParams
    label = "LSFD"
    section = "lsfd"

    def feature_loss(self, fs, ft):
        p = self.params
        d = local_distance(fs, ft, p.window, p.norm, p.eps)
        w = attention(d.detach() if p.detach_attention else d, p.tau)
        return (w * d).mean()
