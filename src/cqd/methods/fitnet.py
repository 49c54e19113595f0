"""FitNet (Romero et al. 2015): hint-based feature distillation.

A trainable regressor r (1x1 conv + BN) maps the student's hint layer F_s to the teacher's guided
layer F_t; loss = CE(g(z), y) + beta * MSE(r(F_s), F_t) [+ lambda * CE_T(g(z), f(x)), Eq. 1's logit
term, off by default]. The teacher sees x and the student z (cross-quality), or they differ in
architecture (compression): when the maps' sizes differ, r(F_s) is resized to F_t's by bilinear
interpolation. Uses the first teacher. Taps default to each net's last feature map.
beta = 100 is mdistiller's CIFAR setting for this MSE (mean over elements).
"""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cqd.methods import METHODS
from cqd.methods.base import Method
from cqd.methods.cqd import KDParams, kd_term
from cqd.models.taps import FeatureTaps, probe


class FitNetParams(KDParams):
    beta: float = Field(100.0, ge=0, description="weight of the hint loss")
    hint: str | None = Field(None, description="student layer (module path); default: its last feature map")
    guided: str | None = Field(None, description="teacher layer (module path); default: its last feature map")
    lam: float = Field(0.0, ge=0, description="weight of Eq. 1's logit term (0: feature loss only)")


@METHODS.register("fitnet")
class FitNet(Method):
    Params = FitNetParams
    label = "FitNet -> B hints"
    uses_teacher = True
    init_from_teacher = "if_same"

    def __init__(self, student, params=None, teachers=(), sample=None):
        super().__init__(student, params, teachers, sample)
        p = self.params
        hint, s_shape = probe(student, p.hint, sample, "method.fitnet.hint on the student")
        guided, t_shape = probe(teachers[0], p.guided, sample, "method.fitnet.guided on the teacher")
        self.taps = FeatureTaps(student, [hint], "method.fitnet.hint on the student")
        self.teacher_taps[0] = [guided]
        self.hint, self.guided = hint, guided
        self.regressor = nn.Sequential(nn.Conv2d(s_shape[1], t_shape[1], 1, bias=False), nn.BatchNorm2d(t_shape[1]))

    def forward(self, step):
        logits = self.student(step.pair.z)
        target = step.teacher_features[0][self.guided]
        fs = self.regressor(self.taps.out[self.hint])
        if fs.shape[-2:] != target.shape[-2:]:
            fs = F.interpolate(fs, size=target.shape[-2:], mode="bilinear", align_corners=False)
        losses = {"loss_ce": self.ce(logits, step.pair.y),
                  "loss_hint": self.params.beta * F.mse_loss(fs.float(), target.detach().float())}
        if self.params.lam:
            losses["loss_kd"] = kd_term(logits, step.teacher_logits, self.params)
        return logits, losses
