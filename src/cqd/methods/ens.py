"""Logit-ensemble distillation: Eq. 1 with f replaced by the ensemble of the teachers f_1..f_K.

    CE(g(z), y) + lambda * KL(q || softmax(g(z) / T)),   q = mean_k softmax(f_k(x_k) / T)

q is the mean of the teachers' softened predictions (not the softmax of their mean logits, which
is what `cqd` distills from several teachers). Each teacher f_k sees its own view x_k (its
`teachers[k].view` and `degradation`: e.g. one teacher of sharp and one of blurred images); its
logits are cached by the engine where x_k is fixed. The keys and scaling are CQD's
(`method.ens.T`, `lam`, `scale`: paper = lambda * KL, hinton = lambda * T^2 * KL), so with one
teacher `ens` is `cqd`. The logged `loss_kd` is the KL (CE_T less the ensemble's entropy).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from cqd.methods import METHODS
from cqd.methods.base import Method, fp32
from cqd.methods.cqd import KDParams


class EnsParams(KDParams):
    loss: Literal["ce"] = Field("ce", description="KL to the ensemble's softened predictions "
                                                  "(mse, between logits, does not apply)")


def ensemble_target(teacher_logits: list[Tensor], T: float) -> Tensor:
    """q = mean_k softmax(f_k / T), detached."""
    return torch.stack([F.softmax(fp32(t.detach()) / T, dim=1) for t in teacher_logits]).mean(0)


def ensemble_kl(student_logits: Tensor, teacher_logits: list[Tensor], T: float) -> Tensor:
    """Mean over the batch of KL(q || softmax(g / T)) with q the ensemble target."""
    q = ensemble_target(teacher_logits, T)
    return (torch.xlogy(q, q) - q * F.log_softmax(fp32(student_logits) / T, dim=1)).sum(1).mean()


def ensemble_term(logits: Tensor, teacher_logits: list[Tensor], p: KDParams) -> Tensor:
    """lambda * KL(q || g) under the paper's or Hinton's scaling (times T^2)."""
    d = ensemble_kl(logits, teacher_logits, p.T)
    return p.lam * (d * p.T * p.T if p.scale == "hinton" else d)


@METHODS.register("ens")
class Ensemble(Method):
    """g learns on z from the labels and from the average of the teachers' softened predictions."""

    Params = EnsParams
    label = "ENS -> B logit ensemble"
    uses_teacher = True
    ensemble = True
    init_from_teacher = "if_same"

    def forward(self, step):
        logits = self.student(step.pair.z)
        return logits, {"loss_ce": self.ce(logits, step.pair.y),
                        "loss_kd": ensemble_term(logits, step.teacher_logits, self.params)}
