import dataclasses
import math
import os

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cqd.degradations import DEGRADATIONS
from cqd.degradations.base import Degradation

_NEIGHBOURS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))


def hysteresis(edges: Tensor) -> Tensor:
    """Canny's hysteresis on kornia's unlinked edges (B, 1, H, W) of 0, 0.5 (weak) and 1 (strong): 1 where a
    pixel is strong or reaches a strong one through 8-connected weak pixels, else 0; the same as
    `kornia.filters.canny(..., hysteresis=True)`.

    Why: kornia grows the strong pixels by one pixel per round, each round a convolution of the whole
    batch, until nothing changes; Fashion-MNIST at 224 px needed 45-105 rounds per batch of 16 or 32, about
    97% of the degradation's time on a CPU (benchmarks/bench_edges.py). This labels the connected
    components of the candidate pixels only (a few % of the image) with FastSV's hooking and pointer
    jumping (Zhang, Azad and Hu, 2020), about 10 rounds, and keeps the components that hold a strong pixel.
    """
    padded = F.pad(edges, (1, 1, 1, 1))  # a zero border: no neighbour wraps to another row or image
    flat = padded.flatten()
    pix = flat.nonzero().squeeze(1)  # the candidates (weak or strong), the graph's nodes
    n = pix.numel()
    dtype = torch.int32 if flat.numel() < 2**31 else torch.long  # a CPU's int64 amin was ~15x slower
    ids = torch.arange(n, dtype=dtype, device=pix.device)
    node = torch.full(flat.shape, -1, dtype=dtype, device=pix.device)
    node[pix] = ids
    width = padded.shape[-1]
    offsets = torch.tensor([dy * width + dx for dy, dx in _NEIGHBOURS], device=pix.device)
    nbrs = node[pix[None, :] + offsets[:, None]]  # (8, n); a missing neighbour is the node itself
    nbrs = torch.where(nbrs < 0, ids, nbrs).flatten()
    parent = grand = ids  # parent[i]: a node of i's component, never above i; the root is its smallest
    while True:  # hook each node and its parent to the smallest grandparent around it, then shortcut
        low = grand.index_select(0, nbrs).view(len(_NEIGHBOURS), n).amin(0)
        hooked = torch.minimum(torch.minimum(parent, low), grand).scatter_reduce_(0, parent.long(), low, "amin")
        parent, before, grand = hooked, grand, hooked.index_select(0, hooked)
        if torch.equal(grand, before):
            break
    while not torch.equal(parent, grand):
        parent, grand = grand, grand.index_select(0, grand)
    root_strong = torch.zeros(n, dtype=torch.bool, device=pix.device)
    root_strong[parent[flat[pix] == 1].long()] = True
    out = torch.zeros_like(flat)
    out[pix] = root_strong[parent.long()].to(out.dtype)
    return out.view(padded.shape)[..., 1:-1, 1:-1]


@DEGRADATIONS.register("edges")
@dataclasses.dataclass
class Edges(Degradation):
    """Line drawing (paper: structured edges): binary Canny edges of the luminance, white on black.

    `low`/`high` are Canny's hysteresis thresholds in kornia's units (unnormalised Sobel magnitude
    after a `sigma` px blur; a 0-to-1 step reaches about 2.6 at sigma=1). With `model`, the path of an
    OpenCV structured-edge model (model.yml.gz), the output is instead the structured edge detector's
    strength map in [0, 1]; that path needs cv2.ximgproc and runs image by image on the CPU.
    """

    name = "edges"
    low: float = 0.1
    high: float = 0.2
    sigma: float = 1.0
    model: str | None = None

    def __post_init__(self):
        if not 0 < self.low <= self.high <= 1:
            self._fail("thresholds need 0 < low <= high <= 1 (kornia's Canny rejects low=0)")
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            self._fail("sigma must be a finite number > 0")
        self._detector = None
        if self.model is not None:
            if not os.path.isfile(self.model) or not os.access(self.model, os.R_OK):
                self._fail(f"structured edge model {self.model!r} does not exist or is not a readable file")
            try:
                from cv2 import ximgproc  # noqa: F401
            except ImportError:
                self._fail(
                    "the structured edge detector needs OpenCV's contrib module cv2.ximgproc: "
                    "pip install 'cqd-distill[sed]' (opencv-contrib-python-headless)"
                )

    def __getstate__(self):
        return {**self.__dict__, "_detector": None}

    def forward(self, x, draws):
        edges = self._structured(x) if self.model is not None else self._canny(x)
        return edges.expand_as(x).contiguous(), None

    def _canny(self, x):
        lum = x if x.shape[1] == 1 else kornia.color.rgb_to_grayscale(x)
        k = min(2 * int(2 * self.sigma + 0.5) + 1, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)
        _, edges = kornia.filters.canny(lum, self.low, self.high, (k, k), (self.sigma, self.sigma), hysteresis=False)
        return hysteresis(edges).to(x.dtype)

    def _structured(self, x):
        if self._detector is None:
            from cv2 import ximgproc

            self._detector = ximgproc.createStructuredEdgeDetection(self.model)
        rgb = x.detach().expand(-1, 3, -1, -1).float() if x.shape[1] == 1 else x.detach().float()
        images = rgb.permute(0, 2, 3, 1).cpu().contiguous().numpy()
        strength = np.stack([self._detector.detectEdges(image) for image in images])
        return torch.from_numpy(strength).to(x.device, x.dtype)[:, None].clamp_(0, 1)
