"""Methods by name. Paper notation: hq = A (teacher, upper bound), lq = B, augment = A+B,
staged = A,B, cqd = CQD; and the related family (fitnet, at, ...). A new method is one file in this
folder with `@METHODS.register(name)`: every module here is imported, so nothing else is edited."""
from cqd.registry import Registry, import_modules

METHODS = Registry("method")

from cqd.methods.base import Method, Phase, Step  # noqa: E402

import_modules(__name__, __path__, skip=("base",))

__all__ = ["METHODS", "Method", "Phase", "Step"]
