"""Models by name: small CIFAR-style nets for the CPU default, `tv:NAME` and `timm:NAME` for the rest."""
from cqd.models.factory import MODELS, create_model

__all__ = ["MODELS", "create_model"]
