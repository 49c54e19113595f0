import dataclasses

import kornia
import torch

from cqd.degradations import DEGRADATIONS
from cqd.degradations.base import Degradation


@DEGRADATIONS.register("jpeg")
@dataclasses.dataclass
class JPEG(Degradation):
    """JPEG compression at `quality` (1..100), kornia's differentiable codec, batched on the batch's device.

    A grey batch is coded as RGB with equal channels and read back as luminance. Any H, W works: the
    codec pads to whole 16 px blocks and crops back.
    """

    name = "jpeg"
    quality: int = 20

    def __post_init__(self):
        if not 1 <= self.quality <= 100:
            self._fail("quality must be between 1 and 100")

    def forward(self, x, draws):
        gray = x.shape[1] == 1
        quality = torch.tensor([float(self.quality)], device=x.device, dtype=x.dtype)
        z = kornia.enhance.jpeg_codec_differentiable(x.expand(-1, 3, -1, -1) if gray else x, quality)
        if gray:
            z = kornia.color.rgb_to_grayscale(z)
        return z.clamp_(0, 1), None
