import dataclasses

from cqd.degradations import DEGRADATIONS
from cqd.degradations.base import Degradation


@DEGRADATIONS.register("noise")
@dataclasses.dataclass
class Noise(Degradation):
    """Additive Gaussian noise of standard deviation `std` (images in [0, 1]), clipped."""

    name = "noise"
    std: float = 0.1

    def __post_init__(self):
        if not self.std >= 0:
            self._fail("std must be >= 0")

    def forward(self, x, draws):
        n = draws.normal(x[0].numel()).view_as(x).to(x.dtype)
        return (x + self.std * n).clamp_(0, 1), None
