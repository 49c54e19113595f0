"""Models by name: small CIFAR-style nets for the CPU default, `tv:NAME` and `timm:NAME` for the rest.
A new built-in model is one file in this folder that registers its builders with `@MODELS.register(name)`."""
from cqd.models.factory import MODELS, create_model
from cqd.registry import import_modules

import_modules(__name__, __path__, skip=("factory", "taps"))

__all__ = ["MODELS", "create_model"]
