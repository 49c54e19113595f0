"""FitNet (Romero et al. 2015): hint-based feature distillation.

A trainable regressor r maps the student's hint layer F_s to the teacher's guided layer F_t;
loss = CE(g(z), y) + beta * MSE(r(F_s), F_t) [+ lambda * CE_T(g(z), f(x)), Eq. 1's logit term, off by
default]. The teacher sees x and the student z (cross-quality), or they differ in architecture
(compression). Uses the first teacher. beta = 100 is RepDistiller's and mdistiller's CIFAR setting for this
MSE (mean over elements), tuned there for the middle stage's hint.

`convention: reference` (the default) follows RepDistiller and mdistiller (`ConvReg`, `hint_layer: 2`): the
hint and guided layers default to each net's middle stage output (`cqd.models.taps.stage_outputs`, the
second of three for the CIFAR ResNets), and r is a conv + BN + ReLU whose conv fits the sizes: 1x1 when
they agree, 3x3 stride 2 when the student's map is twice the teacher's, a 4x4 stride-2 transposed conv when
it is half, a (1 + H_s - H_t) x (1 + W_s - W_t) conv when it is otherwise larger (any other pair of sizes is
an error, as there). `convention: cqd_v1` is cqd's earlier form, which files written before it had the key
are read with: each net's last feature map, r a 1x1 conv (no bias) + BN without ReLU, then a bilinear
resize to F_t's size where the sizes differ.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cqd.errors import ConfigError
from cqd.methods import METHODS
from cqd.methods.base import Method
from cqd.methods.cqd import KDParams, kd_term
from cqd.models.taps import FeatureTaps, probe, stage_outputs


class FitNetParams(KDParams):
    beta: float = Field(100.0, ge=0, description="weight of the hint loss")
    convention: Literal["reference", "cqd_v1"] = Field(
        "reference", description="reference: the middle stage's hint, conv + BN + ReLU regressor (RepDistiller, "
                                 "mdistiller); cqd_v1: the last feature map, 1x1 conv + BN and a bilinear resize "
                                 "(cqd before the key)")
    hint: str | None = Field(None, description="student layer (module path); default: its middle stage's output "
                                               "(cqd_v1: its last feature map)")
    guided: str | None = Field(None, description="teacher layer (module path); default: its middle stage's output "
                                                 "(cqd_v1: its last feature map)")
    lam: float = Field(0.0, ge=0, description="weight of Eq. 1's logit term (0: feature loss only)")


def middle_stage(model: nn.Module, sample) -> str:
    stages = stage_outputs(model, sample)
    return stages[(len(stages) - 1) // 2]


def conv_reg(s_shape, t_shape) -> nn.Sequential:
    """RepDistiller's and mdistiller's regressor from a (B, C_s, H_s, W_s) map to a (B, C_t, H_t, W_t) one."""
    (_, cs, hs, ws), (_, ct, ht, wt) = s_shape, t_shape
    if hs == 2 * ht:
        conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
    elif 2 * hs == ht:
        conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
    else:
        conv = None
    reg = nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU()) if conv is not None else None
    if reg is None or reg[0](torch.zeros(1, cs, hs, ws)).shape[-2:] != (ht, wt):
        raise ConfigError(f"method.fitnet: the reference regressor cannot map the hint's {hs}x{ws} map to the guided "
                          f"layer's {ht}x{wt}: choose layers of the same size (or twice, half, larger), or "
                          "method.fitnet.convention=cqd_v1 (a bilinear resize)")
    return reg


@METHODS.register("fitnet")
class FitNet(Method):
    Params = FitNetParams
    label = "FitNet -> B hints"
    uses_teacher = True
    init_from_teacher = "if_same"

    def __init__(self, student, params=None, teachers=(), sample=None):
        super().__init__(student, params, teachers, sample)
        p = self.params
        ref = p.convention == "reference"
        hint = p.hint or (middle_stage(student, sample) if ref else None)
        guided = p.guided or (middle_stage(teachers[0], sample) if ref else None)
        hint, s_shape = probe(student, hint, sample, "method.fitnet.hint on the student")
        guided, t_shape = probe(teachers[0], guided, sample, "method.fitnet.guided on the teacher")
        self.taps = FeatureTaps(student, [hint], "method.fitnet.hint on the student")
        self.teacher_taps[0] = [guided]
        self.hint, self.guided = hint, guided
        self.regressor = (conv_reg(s_shape, t_shape) if ref else
                          nn.Sequential(nn.Conv2d(s_shape[1], t_shape[1], 1, bias=False), nn.BatchNorm2d(t_shape[1])))

    def forward(self, step):
        logits = self.student(step.pair.z)
        target = step.teacher_features[0][self.guided]
        fs = self.regressor(self.taps.out[self.hint])
        if fs.shape[-2:] != target.shape[-2:]:  # cqd_v1 only: the reference regressor gives the target's size
            fs = F.interpolate(fs, size=target.shape[-2:], mode="bilinear", align_corners=False)
        losses = {"loss_ce": self.ce(logits, step.pair.y),
                  "loss_hint": self.params.beta * F.mse_loss(fs.float(), target.detach().float())}
        if self.params.lam:
            losses["loss_kd"] = kd_term(logits, step.teacher_logits, self.params)
        return logits, losses
