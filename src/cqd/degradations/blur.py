import dataclasses

import kornia

from cqd.degradations import DEGRADATIONS
from cqd.degradations.base import Degradation


@DEGRADATIONS.register("blur")
@dataclasses.dataclass
class Blur(Degradation):
    """Gaussian blur with standard deviation `sigma` px (kernel covers +-3 sigma)."""

    name = "blur"
    sigma: float = 1.5

    def __post_init__(self):
        if not self.sigma > 0:
            self._fail("sigma must be > 0")

    def forward(self, x, draws):
        k = 2 * int(3 * self.sigma + 0.5) + 1
        k = min(k, 2 * (min(x.shape[-2:]) // 2) - 1)
        return kornia.filters.gaussian_blur2d(x, (k, k), (self.sigma, self.sigma), border_type="reflect"), None
