"""MATLAB's bicubic `imresize(img, [h w])`, written from its definition: the resize that the published LR
images of DIV2K, Set5, ... and every SR paper's bicubic numbers are made with.

Each dimension is resized on its own, the one that shrinks more first (rows first when both scales agree, as
MATLAB orders them). Along a dimension of n pixels resized to m, s = m / n, output pixel j (1-based) sits at
input coordinate u = j / s + (1 - 1 / s) / 2 and is sum_i w_i x_i over the input pixels i within the kernel's
reach, w_i = h(u - i) normalized to sum to 1, with h Keys' cubic kernel (a = -0.5); when shrinking (s < 1)
h(x) = s * cubic(s * x), the kernel widened by 1 / s, which is MATLAB's antialiasing. Pixels past either end
are mirrored, the edge repeated (pixel 0 is pixel 1, pixel n + 1 is pixel n: symmetric padding). An uint8
image is rounded (half away from zero) and clipped back to uint8 after each dimension, as MATLAB keeps the
input's class; other inputs come back as float64.
"""
from __future__ import annotations

import math

import numpy as np


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (Keys 1981)."""
    ax = np.abs(x)
    return np.where(ax <= 1, 1.5 * ax**3 - 2.5 * ax**2 + 1,
                    np.where(ax <= 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, 0.0))


def contributions(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(weights, indices), each (m, P): output pixel j is sum_p weights[j, p] * x[indices[j, p]] (0-based indices,
    mirrored into 0..n-1) when n pixels are resized to m."""
    s = m / n
    width = 4.0 / s if s < 1 else 4.0
    u = np.arange(1, m + 1, dtype=np.float64) / s + 0.5 * (1 - 1 / s)
    left = np.floor(u - width / 2)
    taps = left[:, None] + np.arange(math.ceil(width) + 2)[None, :]  # 1-based input pixels, one extra on the right
    d = u[:, None] - taps
    w = s * cubic(s * d) if s < 1 else cubic(d)
    w = w / w.sum(1, keepdims=True)
    mirror = np.concatenate([np.arange(n), np.arange(n)[::-1]])  # symmetric padding, period 2n
    return w, mirror[(taps.astype(np.int64) - 1) % (2 * n)]


def _along(a: np.ndarray, axis: int, m: int, to_uint8: bool, chunk: int = 256) -> np.ndarray:
    w, idx = contributions(a.shape[axis], m)
    moved = np.moveaxis(a, axis, 0)
    x = np.ascontiguousarray(moved).reshape(moved.shape[0], -1)
    out = np.empty((m, x.shape[1]))
    for c in range(0, x.shape[1], chunk):  # a few columns at a time, the taps summed in order (cache-sized blocks)
        block = x[:, c:c + chunk].astype(np.float64)
        acc = np.zeros((m, block.shape[1]))
        for p in range(w.shape[1]):
            acc += w[:, p, None] * block[idx[:, p]]
        out[:, c:c + chunk] = acc
    if to_uint8:
        out = np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    return np.moveaxis(out.reshape(m, *moved.shape[1:]), 0, axis)


def imresize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`img` (H, W) or (H, W, C) resized to `size` = (height, width) as MATLAB's bicubic imresize does."""
    h, w = size
    if h < 1 or w < 1:
        raise ValueError(f"imresize: output size {size} must be at least 1 x 1")
    to_uint8 = img.dtype == np.uint8
    order = (0, 1) if h / img.shape[0] <= w / img.shape[1] else (1, 0)
    out = img
    for axis in order:
        out = _along(out, axis, size[axis], to_uint8)
    return out
