import dataclasses

import kornia

from cqd.degradations import DEGRADATIONS
from cqd.degradations.base import Degradation


@DEGRADATIONS.register("gray")
@dataclasses.dataclass
class Gray(Degradation):
    """Drop colour: ITU-R 601 luminance, repeated over the input's channels."""

    name = "gray"

    def forward(self, x, draws):
        if x.shape[1] == 1:
            return x, None
        return kornia.color.rgb_to_grayscale(x).expand_as(x).contiguous(), None
