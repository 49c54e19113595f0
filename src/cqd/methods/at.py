"""Attention transfer (Zagoruyko and Komodakis 2017): match where the networks look.

The spatial attention map of a feature map F (B, C, H, W) is A(F) = mean_c |F_c|^p (p = 2), flattened
and L2-normalized per image; loss = CE(g(z), y) + beta * sum over tapped stages of
mean((A(F_s) - A(F_t))^2) [+ lambda * CE_T, off by default], beta = 1000. Uses the first teacher.

`convention: reference` (the default) follows the authors' code (szagoruyko/attention-transfer), RepDistiller
and mdistiller, which agree: the weight is beta * sum, the taps default to every stage's output after the stem
(`cqd.models.taps.stage_outputs`: three for the CIFAR ResNets; the two lists pair up from the first, as
`zip` pairs them there), and maps of different sizes are average-pooled as feature maps to the smaller size
before their attention maps are taken. `convention: cqd_v1` is cqd's earlier form, which files written before
it had the key are read with: beta/2 * sum, each net's last feature map, the attention map pooled instead.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from cqd.errors import ConfigError
from cqd.methods import METHODS
from cqd.methods.base import Method
from cqd.methods.cqd import KDParams, kd_term
from cqd.models.taps import FeatureTaps, probe, stage_outputs


class ATParams(KDParams):
    beta: float = Field(1000.0, ge=0, description="weight of the attention loss (the paper's beta)")
    p: float = Field(2.0, gt=0, description="exponent of the attention map")
    convention: Literal["reference", "cqd_v1"] = Field(
        "reference", description="reference: beta * sum, every stage's output, feature maps pooled (the authors' "
                                 "code, RepDistiller, mdistiller); cqd_v1: beta/2 * sum, the last feature map, "
                                 "attention maps pooled (cqd before the key)")
    student_layers: list[str] | None = Field(None, description="student layers; default: every stage's output "
                                                              "(cqd_v1: the last feature map)")
    teacher_layers: list[str] | None = Field(None, description="teacher layers, one per student layer; default: "
                                                              "every stage's output (cqd_v1: the last feature map)")
    lam: float = Field(0.0, ge=0, description="weight of Eq. 1's logit term (0: attention loss only)")

    @model_validator(mode="after")
    def _pairs(self) -> "ATParams":
        if self.convention == "reference" and (self.student_layers is None or self.teacher_layers is None):
            return self  # a default list's length is known once the nets are
        if len(self.student_layers or [None]) != len(self.teacher_layers or [None]):
            raise ValueError("student_layers and teacher_layers must pair up: give the same number of each")
        return self


def attention(f: Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> Tensor:
    """(B, H*W) L2-normalized map of mean_c |F_c|^p, average-pooled to `size` first if given (cqd_v1's pooling)."""
    a = f.float().abs().pow(p).mean(1, keepdim=True)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.adaptive_avg_pool2d(a, size)
    return F.normalize(a.flatten(1), dim=1)


def at_loss(fs: Tensor, ft: Tensor, p: float = 2.0, pool: str = "feature") -> Tensor:
    """mean((A(F_s) - A(F_t))^2) of one pair of maps; maps of different sizes meet at the smaller size, the feature
    maps average-pooled there (`pool: feature`, the references') or their attention maps (`attention`, cqd_v1)."""
    size = tuple(min(a, b) for a, b in zip(fs.shape[-2:], ft.shape[-2:]))
    if pool == "attention":
        return (attention(fs, p, size) - attention(ft, p, size)).pow(2).mean()
    fs, ft = (f if tuple(f.shape[-2:]) == size else F.adaptive_avg_pool2d(f, size) for f in (fs, ft))
    return (attention(fs, p) - attention(ft, p)).pow(2).mean()


def layer_pairs(student, teacher, p: ATParams, sample) -> list[tuple[str, str]]:
    """(student layer, teacher layer) of each tapped stage, each checked on `sample`."""
    ref = p.convention == "reference"
    s = [probe(student, n, sample, "method.at.student_layers on the student")[0]
         for n in p.student_layers or (stage_outputs(student, sample) if ref else [None])]
    t = [probe(teacher, n, sample, "method.at.teacher_layers on the teacher")[0]
         for n in p.teacher_layers or (stage_outputs(teacher, sample) if ref else [None])]
    if len(s) != len(t) and (p.student_layers or p.teacher_layers):
        raise ConfigError(f"method.at: {len(s)} student layer(s) ({', '.join(s)}) but {len(t)} teacher layer(s) "
                          f"({', '.join(t)}): give both student_layers and teacher_layers, one per pair")
    return list(zip(s, t))  # default lists of different lengths: the first stages pair up (RepDistiller's zip)


@METHODS.register("at")
class AttentionTransfer(Method):
    Params = ATParams
    label = "AT -> B attention transfer"
    uses_teacher = True
    init_from_teacher = "if_same"

    def __init__(self, student, params=None, teachers=(), sample=None):
        super().__init__(student, params, teachers, sample)
        self.pairs = layer_pairs(student, teachers[0], self.params, sample)
        self.taps = FeatureTaps(student, [s for s, _ in self.pairs], "method.at.student_layers on the student")
        self.teacher_taps[0] = [t for _, t in self.pairs]

    def forward(self, step):
        p = self.params
        logits = self.student(step.pair.z)
        pool, weight = ("attention", p.beta / 2) if p.convention == "cqd_v1" else ("feature", p.beta)
        total = sum(at_loss(self.taps.out[s], step.teacher_features[0][t].detach(), p.p, pool) for s, t in self.pairs)
        losses = {"loss_ce": self.ce(logits, step.pair.y), "loss_at": weight * total}
        if p.lam:
            losses["loss_kd"] = kd_term(logits, step.teacher_logits, p)
        return logits, losses
