"""Methods by name. Paper notation: hq = A (teacher, upper bound), lq = B, augment = A+B,
staged = A,B, cqd = CQD. A new method is one file with `@METHODS.register(name)` plus its import below."""
from cqd.registry import Registry

METHODS = Registry("method")

from cqd.methods import cqd, supervised  # noqa: E402,F401
from cqd.methods.base import Method  # noqa: E402

PAPER_NAMES = {"hq": "A", "lq": "B", "augment": "A+B", "staged": "A,B", "cqd": "CQD"}

__all__ = ["METHODS", "Method", "PAPER_NAMES"]
