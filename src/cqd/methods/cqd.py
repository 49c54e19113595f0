"""Cross quality distillation, Eq. 1: CE(g(z), y) + lambda * CE_T(g(z), f(x)).

CE_T is the cross-entropy between temperature-softened predictions,
L2(p, q) = L1(softmax(log p / T), softmax(log q / T)), which equals softmax(logits / T) on both
sides. Scaling conventions:
  scale="paper"  lambda * CE_T, as in the authors' code (no T^2): use the paper's lambda (200 CUB, 50 Cars)
  scale="hinton" lambda * T^2 * CE_T, Hinton et al.'s KD, which keeps gradients comparable across T
`loss="mse"` is the squared error between logits the paper found to work similarly.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from cqd.methods import METHODS
from cqd.methods.base import Method, fp32


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Mean over the batch of -sum_k softmax(t/T)_k log softmax(s/T)_k."""
    q = F.softmax(fp32(teacher_logits) / T, dim=1)
    return -(q * F.log_softmax(fp32(student_logits) / T, dim=1)).sum(1).mean()


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 10.0,
                      loss: str = "ce", scale: str = "paper") -> Tensor:
    """The un-weighted distillation term L2(g(z), f(x)) of Eq. 1 under the chosen convention."""
    if loss == "mse":
        return F.mse_loss(fp32(student_logits), fp32(teacher_logits))
    d = soft_cross_entropy(student_logits, teacher_logits, T)
    return d * T * T if scale == "hinton" else d


@METHODS.register("cqd")
class CQD(Method):
    """g learns on z from the labels and from f's predictions on the paired x."""

    uses_teacher = True
    init_from_teacher = "if_same"

    def __init__(self, student, T: float = 10.0, lam: float = 50.0, loss: str = "ce", scale: str = "paper"):
        super().__init__(student)
        self.T, self.lam, self.loss, self.scale = T, lam, loss, scale

    def forward(self, pair, teacher_logits=None):
        logits = self.student(pair.z)
        kd = distillation_loss(logits, teacher_logits, self.T, self.loss, self.scale)
        return logits, {"loss_ce": self.ce(logits, pair.y), "loss_kd": self.lam * kd}
