"""Attention transfer (Zagoruyko and Komodakis 2017): match where the networks look.

The spatial attention map of a feature map F (B, C, H, W) is A(F) = mean_c F_c^p (p = 2), flattened
and L2-normalized per image; loss = CE(g(z), y) + beta/2 * sum over tapped stages of
mean((A(F_s) - A(F_t))^2) [+ lambda * CE_T, off by default]. Maps of different sizes (compression)
are average-pooled to the smaller size first. beta = 1000 as in the paper (and mdistiller).
Uses the first teacher; taps default to each net's last feature map.
"""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from cqd.methods import METHODS
from cqd.methods.base import Method
from cqd.methods.cqd import KDParams, kd_term
from cqd.models.taps import FeatureTaps, probe


class ATParams(KDParams):
    beta: float = Field(1000.0, ge=0, description="weight of the attention loss (the paper's beta)")
    p: float = Field(2.0, gt=0, description="exponent of the attention map")
    student_layers: list[str] | None = Field(None, description="student layers; default: its last feature map")
    teacher_layers: list[str] | None = Field(None, description="teacher layers, one per student layer; "
                                                              "default: its last feature map")
    lam: float = Field(0.0, ge=0, description="weight of Eq. 1's logit term (0: attention loss only)")

    @model_validator(mode="after")
    def _pairs(self) -> "ATParams":
        if len(self.student_layers or [None]) != len(self.teacher_layers or [None]):
            raise ValueError("student_layers and teacher_layers must pair up: give the same number of each")
        return self


def attention(f: Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> Tensor:
    """(B, H*W) L2-normalized map of mean_c |F_c|^p, average-pooled to `size` first if given."""
    a = f.float().abs().pow(p).mean(1, keepdim=True)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.adaptive_avg_pool2d(a, size)
    return F.normalize(a.flatten(1), dim=1)


@METHODS.register("at")
class AttentionTransfer(Method):
    Params = ATParams
    label = "AT -> B attention transfer"
    uses_teacher = True
    init_from_teacher = "if_same"

    def __init__(self, student, params=None, teachers=(), sample=None):
        super().__init__(student, params, teachers, sample)
        p = self.params
        pairs = zip(p.student_layers or [None], p.teacher_layers or [None])
        self.pairs = [(probe(student, s, sample, "method.at.student_layers on the student")[0],
                       probe(teachers[0], t, sample, "method.at.teacher_layers on the teacher")[0]) for s, t in pairs]
        self.taps = FeatureTaps(student, [s for s, _ in self.pairs], "method.at.student_layers on the student")
        self.teacher_taps[0] = [t for _, t in self.pairs]

    def forward(self, step):
        logits = self.student(step.pair.z)
        total = 0.0
        for s, t in self.pairs:
            fs, ft = self.taps.out[s], step.teacher_features[0][t].detach()
            size = tuple(min(a, b) for a, b in zip(fs.shape[-2:], ft.shape[-2:]))
            total = total + (attention(fs, self.params.p, size) - attention(ft, self.params.p, size)).pow(2).mean()
        losses = {"loss_ce": self.ce(logits, step.pair.y), "loss_at": self.params.beta / 2 * total}
        if self.params.lam:
            losses["loss_kd"] = kd_term(logits, step.teacher_logits, self.params)
        return logits, losses
