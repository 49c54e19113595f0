import dataclasses

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from cqd.degradations import DEGRADATIONS
from cqd.degradations.base import Degradation
from cqd.errors import CQDError


@DEGRADATIONS.register("clutter")
@dataclasses.dataclass
class Clutter(Degradation):
    """Localization for centred datasets: paste the item at a random scale and place in clutter.

    The background is a `canvas` px square mosaic of pieces x pieces random images from the bound bank.
    The item's side is uniform in [min_scale, max_scale] x canvas, at a uniform position fully inside.
    It is blended with alpha = clamp(4 x luminance), so a dark-background item (Fashion-MNIST) keeps
    only its bright shape while a bright photo covers its whole box. The canvas is resized back to the
    input's H x W and the box is the item's xyxy in those output pixels.
    """

    name = "clutter"
    needs_bank = True
    canvas: int = 64
    min_scale: float = 0.35
    max_scale: float = 0.6
    pieces: int = 2

    def __post_init__(self):
        if self.canvas < 1:
            self._fail("canvas must be >= 1 pixel")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            self._fail("scales need 0 < min_scale <= max_scale <= 1 (item side as a fraction of the canvas)")
        if not 1 <= self.pieces <= self.canvas:
            self._fail(f"pieces must be between 1 and canvas={self.canvas}")
        self._bank = self._bank_here = None

    def check(self, channels, size):
        if self.canvas < size:
            self._fail(f"canvas={self.canvas} is smaller than the image ({size} px); use canvas >= {size}")

    def bind(self, bank):
        if not (isinstance(bank, Tensor) and bank.dtype == torch.uint8 and bank.ndim == 4 and len(bank) > 0
                and bank.shape[1] in (1, 3)):
            got = f"{bank.dtype} {tuple(bank.shape)}" if isinstance(bank, Tensor) else type(bank).__name__
            self._fail(f"bank must be a non-empty uint8 (N, C, H, W) tensor with C = 1 or 3, got {got}")
        self._bank, self._bank_here = bank, None

    def __getstate__(self):
        return {**self.__dict__, "_bank_here": None}

    def forward(self, x, draws):
        if self._bank is None:
            raise CQDError(
                f"clutter needs images to make clutter from; bind a bank of dataset images first "
                f"(degradation.bind(dataset.clutter_bank(n))) before applying {self.spec()!r}"
            )
        if self._bank_here is None or self._bank_here.device != x.device:
            self._bank_here = self._bank.to(x.device)
        b, c, h, w = x.shape
        background = self._background(draws.integers(len(self._bank), self.pieces**2), c, x.dtype)
        u = draws.uniform(3).to(x.dtype)
        side = (self.min_scale + (self.max_scale - self.min_scale) * u[:, 0]) * self.canvas
        x0, y0 = u[:, 1] * (self.canvas - side), u[:, 2] * (self.canvas - side)
        zoom, zero = self.canvas / side, torch.zeros_like(side)
        cx, cy = (2 * x0 + side) / self.canvas - 1, (2 * y0 + side) / self.canvas - 1
        theta = torch.stack([zoom, zero, -cx * zoom, zero, zoom, -cy * zoom], 1).view(b, 2, 3)
        grid = F.affine_grid(theta, [b, c + 1, self.canvas, self.canvas], align_corners=False)
        lum = x if c == 1 else kornia.color.rgb_to_grayscale(x)
        alpha = (4 * lum).clamp(0, 1)
        # premultiplied alpha: zero padding makes the resampled alpha the inside-the-box indicator too
        layers = F.grid_sample(torch.cat([alpha * x, alpha], 1), grid, padding_mode="zeros", align_corners=False)
        canvas = layers[:, :c] + (1 - layers[:, c:]) * background
        z = F.interpolate(canvas, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
        box = torch.stack([x0 * w, y0 * h, (x0 + side) * w, (y0 + side) * h], 1) / self.canvas
        return z, box.float()

    def _background(self, pick, channels, dtype):
        """(B, C, canvas, canvas) mosaic of the bank images `pick` (B, pieces^2), row by row."""
        b, n = pick.shape[0], self.pieces
        piece = -(-self.canvas // n)
        tiles = self._bank_here[pick.flatten()].to(dtype) / 255
        tiles = F.interpolate(tiles, size=(piece, piece), mode="bilinear", antialias=True, align_corners=False)
        if tiles.shape[1] != channels:
            tiles = tiles.expand(-1, channels, -1, -1) if tiles.shape[1] == 1 else kornia.color.rgb_to_grayscale(tiles)
        mosaic = tiles.view(b, n, n, channels, piece, piece).permute(0, 3, 1, 4, 2, 5)
        return mosaic.reshape(b, channels, n * piece, n * piece)[..., : self.canvas, : self.canvas]
