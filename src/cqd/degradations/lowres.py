import dataclasses

import torch.nn.functional as F

from cqd.degradations import DEGRADATIONS
from cqd.degradations.base import Degradation


@DEGRADATIONS.register("lowres")
@dataclasses.dataclass
class LowRes(Degradation):
    """Antialiased downsample to `size` px, then bilinear upsample back (paper: 224 -> 50 -> 224)."""

    name = "lowres"
    size: int = 8

    def __post_init__(self):
        if self.size < 1:
            self._fail("size must be >= 1 pixel")

    def check(self, channels, size):
        if self.size > size:
            self._fail(f"size={self.size} is larger than the image ({size} px); use a size below {size}")

    def forward(self, x, draws):
        h, w = x.shape[-2:]
        small = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).clamp_(0, 1), None
