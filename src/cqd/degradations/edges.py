import dataclasses
import math
import os

import kornia
import numpy as np
import torch

from cqd.degradations import DEGRADATIONS
from cqd.degradations.base import Degradation


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
        _, edges = kornia.filters.canny(lum, self.low, self.high, (k, k), (self.sigma, self.sigma))
        return edges.to(x.dtype)

    def _structured(self, x):
        if self._detector is None:
            from cv2 import ximgproc

            self._detector = ximgproc.createStructuredEdgeDetection(self.model)
        rgb = x.detach().expand(-1, 3, -1, -1).float() if x.shape[1] == 1 else x.detach().float()
        images = rgb.permute(0, 2, 3, 1).cpu().contiguous().numpy()
        strength = np.stack([self._detector.detectEdges(image) for image in images])
        return torch.from_numpy(strength).to(x.device, x.dtype)[:, None].clamp_(0, 1)
