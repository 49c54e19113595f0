import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cqd.degradations import DEGRADATIONS
from cqd.degradations.base import Degradation


@functools.lru_cache(maxsize=8)
def _tps_operator(grid: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(H*W, grid^2) map from control-point shifts to every pixel's shift, and the pixel-centre grid.

    The control points are a regular lattice, so the thin-plate-spline system matrix is fixed and the
    spline through the shifts is linear in them. Coordinates are grid_sample's (align_corners=False).
    """
    line = torch.linspace(-1, 1, grid, dtype=torch.float64)
    centers = torch.stack(torch.meshgrid(line, line, indexing="xy"), -1).view(-1, 2)
    k = len(centers)

    def basis(points: Tensor) -> Tensor:
        r2 = torch.cdist(points, centers).square()
        radial = torch.where(r2 > 0, 0.5 * r2 * torch.log(torch.where(r2 > 0, r2, 1.0)), 0.0)
        return torch.cat([radial, torch.ones(len(points), 1, dtype=torch.float64), points], 1)

    system = torch.zeros(k + 3, k + 3, dtype=torch.float64)
    system[:k] = basis(centers)
    system[k:, :k] = system[:k, k:].T
    unit_shifts = torch.eye(k + 3, k, dtype=torch.float64)
    ys = (2 * torch.arange(h, dtype=torch.float64) + 1) / h - 1
    xs = (2 * torch.arange(w, dtype=torch.float64) + 1) / w - 1
    pixels = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)
    operator = basis(pixels.view(-1, 2)) @ torch.linalg.solve(system, unit_shifts)
    return operator.to(device, dtype), pixels.to(device, dtype)


@DEGRADATIONS.register("tps")
@dataclasses.dataclass
class TPS(Degradation):
    """Thin-plate-spline warp (paper: 14x14 control points, each shifted by N(0, 4 px) on 224 px images).

    `sigma` is in pixels of a 224 px image and scales with the image height, so the warp looks the same
    at any resolution. Output pixel at lattice point g shows the input at g + shift (the spline through
    the shifts elsewhere); borders replicate the edge. The spline is a cached (H*W, grid^2) matrix, so a
    batch costs one matmul and one grid_sample.
    """

    name = "tps"
    grid: int = 14
    sigma: float = 4.0

    def __post_init__(self):
        if self.grid < 2:
            self._fail("grid must be >= 2 control points per side")
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            self._fail("sigma must be a finite number >= 0 (pixels of a 224 px image)")

    def forward(self, x, draws):
        b, _, h, w = x.shape
        operator, pixels = _tps_operator(self.grid, h, w, x.device, x.dtype)
        sigma_px = self.sigma * h / 224
        scale = torch.tensor([2 * sigma_px / w, 2 * sigma_px / h], device=x.device, dtype=x.dtype)
        shifts = draws.normal(2 * self.grid**2).view(b, -1, 2).to(x.dtype) * scale
        flow = (operator @ shifts).view(b, h, w, 2)
        z = F.grid_sample(x, pixels + flow, padding_mode="border", align_corners=False)
        return z.clamp_(0, 1), None
