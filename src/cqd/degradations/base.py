"""The degradation T: z = T(x), batched tensor ops with per-sample randomness keyed by (seed, index).

Randomness comes from a counter-based hash (splitmix64) of (seed, sample index, epoch, stream,
draw number) computed as int64 tensor ops, so a whole batch draws its parameters at once on any
device, and sample i gets the same twin whatever batch, order or device it lands in.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from cqd.errors import CQDError


def _s64(c: int) -> int:
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN, _M1, _M2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _srl(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: Tensor) -> Tensor:
    z = z + _GOLDEN
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


class Draws:
    """Per-sample random numbers for a batch: row b depends only on (seed, index[b], epoch, stream).

    `epoch=None` fixes the pairs (the paper's setting: degraded sets generated once);
    an int gives fresh draws each epoch.
    """

    def __init__(self, seed: int, index: Tensor, epoch: int | None = None, stream: int = 0):
        key = _mix(torch.full_like(index, seed, dtype=torch.int64) ^ stream)
        key = _mix(key + index.to(torch.int64))
        self.key = _mix(key + (-1 if epoch is None else epoch))
        self.seed, self.index, self.epoch, self.stream = seed, index, epoch, stream
        self._counter = 0

    def substream(self, k: int) -> Draws:
        """Independent draws for the k-th stage of a composition."""
        return Draws(self.seed, self.index, self.epoch, self.stream * 1000 + k + 1)

    def _bits(self, n: int) -> Tensor:
        j = torch.arange(n, device=self.key.device, dtype=torch.int64) + self._counter
        self._counter += n
        return _mix(self.key[:, None] + _mix(j)[None, :])

    def uniform(self, n: int) -> Tensor:
        """(B, n) float32 uniform in [0, 1)."""
        return _srl(self._bits(n), 40).to(torch.float32) * (1.0 / (1 << 24))

    def normal(self, n: int) -> Tensor:
        """(B, n) float32 standard normal (Box-Muller)."""
        u1, u2 = self.uniform(n), self.uniform(n)
        return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2 * torch.pi * u2)

    def integers(self, high: int, n: int) -> Tensor:
        """(B, n) int64 uniform in [0, high)."""
        return (self.uniform(n) * high).long().clamp_(max=high - 1)


@dataclasses.dataclass
class Degradation:
    """One known transformation T. Subclasses are dataclasses whose fields are the spec's params.

    `forward(x, draws)` takes a float batch (B, C, H, W) in [0, 1] and returns (z, box) where box is
    the object's (B, 4) xyxy pixel box in z when T moves the object (clutter), else None.
    """

    name: ClassVar[str] = ""
    needs_bank: ClassVar[bool] = False  # bind() wants other images of the dataset

    def check(self, channels: int, size: int) -> None:
        """Raise CQDError if T cannot apply to images of this shape (called once, before training)."""

    def bind(self, bank: Tensor) -> None:
        """Receive a uint8 bank (N, C, H, W) of other images of the dataset (used by clutter)."""

    def forward(self, x: Tensor, draws: Draws) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def __call__(self, x: Tensor, index: Tensor, seed: int = 0, epoch: int | None = None):
        """z, box = T(x, index): x float (B, C, H, W) in [0, 1]; index the samples' dataset indices."""
        if x.ndim != 4 or not x.is_floating_point():
            raise CQDError(f"degradation {self.spec()!r} needs a float (B, C, H, W) batch, "
                           f"got {tuple(x.shape)} {x.dtype}")
        return self.forward(x, Draws(seed, index.to(x.device), epoch))

    def spec(self) -> str:
        params = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if f.repr and getattr(self, f.name) != f.default
        ]
        return self.name + (":" + ",".join(params) if params else "")

    def _fail(self, what: str) -> None:
        raise CQDError(f"degradation {self.spec()!r}: {what}")


@dataclasses.dataclass
class Compose(Degradation):
    """`a+b`: apply a, then b. The box is the last one a stage reported."""

    stages: list = dataclasses.field(default_factory=list)

    def check(self, channels: int, size: int) -> None:
        for s in self.stages:
            s.check(channels, size)

    @property
    def needs_bank(self) -> bool:
        return any(s.needs_bank for s in self.stages)

    def bind(self, bank: Tensor) -> None:
        for s in self.stages:
            s.bind(bank)

    def forward(self, x, draws):
        box = None
        for k, stage in enumerate(self.stages):
            x, b = stage.forward(x, draws.substream(k))
            box = b if b is not None else box
        return x, box

    def spec(self) -> str:
        return "+".join(s.spec() for s in self.stages)


@dataclasses.dataclass
class Identity(Degradation):
    """`none`: z = x (used when the views differ, e.g. localization: x = box crop, z = full image)."""

    name: ClassVar[str] = "none"

    def forward(self, x, draws):
        return x, None
