"""Cross quality distillation, Eq. 1: CE(g(z), y) + lambda * CE_T(g(z), f(x)).

CE_T is the cross-entropy between temperature-softened predictions,
L2(p, q) = L1(softmax(log p / T), softmax(log q / T)), which equals softmax(logits / T) on both
sides. Scaling conventions:
  scale="paper"  lambda * CE_T, as in the authors' code (no T^2): use the paper's lambda (200 CUB, 50 Cars)
  scale="hinton" lambda * T^2 * CE_T, Hinton et al.'s KD, which keeps gradients comparable across T
`loss="mse"` is the squared error between logits the paper found to work similarly.

The logged `loss_kd` is lambda * KL(f || g) at temperature T: CE_T minus the teacher's entropy, a
constant for g, so the gradient is Eq. 1's, and the number falls to 0 as g matches f (CE_T itself
stays near the teacher's entropy, e.g. 113 at T = 10, lambda = 50, and hides the progress).
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from cqd.methods import METHODS
from cqd.methods.base import Method, fp32
from cqd.schema import Strict


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Mean over the batch of -sum_k softmax(t/T)_k log softmax(s/T)_k."""
    q = F.softmax(fp32(teacher_logits) / T, dim=1)
    return -(q * F.log_softmax(fp32(student_logits) / T, dim=1)).sum(1).mean()


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Mean over the batch of KL(softmax(t/T) || softmax(s/T)) = CE_T - H(softmax(t/T))."""
    t = fp32(teacher_logits) / T
    q = F.softmax(t, dim=1)  # as in CE_T, so the student's gradient is CE_T's to the last bit
    return (q * (F.log_softmax(t, dim=1) - F.log_softmax(fp32(student_logits) / T, dim=1))).sum(1).mean()


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 10.0,
                      loss: str = "ce", scale: str = "paper") -> Tensor:
    """The un-weighted distillation term L2(g(z), f(x)) of Eq. 1 under the chosen convention, as a KL
    (CE_T less the teacher's entropy: same gradient). No gradient reaches the teacher's logits."""
    teacher_logits = teacher_logits.detach()
    if loss == "mse":
        return F.mse_loss(fp32(student_logits), fp32(teacher_logits))
    d = soft_kl(student_logits, teacher_logits, T)
    return d * T * T if scale == "hinton" else d


class KDParams(Strict):
    T: float = Field(10.0, gt=0, description="temperature")
    lam: float = Field(50.0, ge=0, description="lambda, weight of the distillation term")
    loss: Literal["ce", "mse"] = "ce"
    scale: Literal["paper", "hinton"] = Field("paper", description="paper: lambda*CE_T; hinton: lambda*T^2*CE_T")


def kd_term(logits: Tensor, teacher_logits: list[Tensor], p: KDParams) -> Tensor:
    """lambda * L2(g(z), f(x)), with f the average of the teachers' logits when there are several."""
    t = teacher_logits[0] if len(teacher_logits) == 1 else sum(teacher_logits) / len(teacher_logits)
    return p.lam * distillation_loss(logits, t, p.T, p.loss, p.scale)


@METHODS.register("cqd")
class CQD(Method):
    """g learns on z from the labels and from f's predictions on the paired x."""

    Params = KDParams
    label = "CQD -> B cqd (proposed)"
    uses_teacher = True
    init_from_teacher = "if_same"

    def forward(self, step):
        logits = self.student(step.pair.z)
        return logits, {"loss_ce": self.ce(logits, step.pair.y),
                        "loss_kd": kd_term(logits, step.teacher_logits, self.params)}
