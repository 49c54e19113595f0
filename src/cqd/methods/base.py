"""A method turns a paired batch into the student's logits and named losses (mdistiller's shape).

The engine sums the losses and logs each by name; it never branches on which method it runs.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cqd.data.paired import Pair


class Method(nn.Module):
    """Owns the student g (trained) and, when `uses_teacher`, the frozen teacher f.

    Class attributes tell the engine what the method needs:
      uses_teacher      f's logits on x are passed to `forward` (cached when x is fixed)
      init_from_teacher g starts from f's weights: "never", "always" (staged) or "if_same" (CQD,
                        when f and g share an architecture: the paper's best setting)
    """

    uses_teacher: ClassVar[bool] = False
    init_from_teacher: ClassVar[str] = "never"

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, pair: Pair, teacher_logits: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    @staticmethod
    def ce(logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(fp32(logits), y)


def fp32(t: Tensor) -> Tensor:
    """Logits for a loss: half/bfloat16 (autocast) go up to float32; float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

