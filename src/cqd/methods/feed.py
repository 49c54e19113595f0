"""Parallel FEED (Park and Kwak, "FEED: Feature-level Ensemble for Knowledge Distillation"): one
non-linear transform t_k per teacher on the student's feature map, the per-teacher losses summed.

    CE(g(z), y) + beta * sum_k d(t_k(F_s), F_k) [+ lambda * KL(mean_k softmax(f_k / T) || softmax(g / T))]

F_s is the student's tapped map on z, F_k teacher k's on its own view x_k. d is factor transfer's
distance (Kim, Park, Kwak 2018; FEED builds on it, and we keep its loss). `distance` names a distance and,
unless `beta` is given, the weight of the same reference:
  l1            (default) the official FT code's (Jangho-Kim/Factor-Transfer-pytorch): each map flattened
                per image and L2-normalized, then the mean absolute difference; beta 500, that code's default
  repdistiller  RepDistiller's FT: the L2-normalized attention map mean_c a^2 of each map (the larger one
                average-pooled to the smaller size first), then the mean absolute difference; beta 200, its
                CRD-benchmark weight
  l2            the mean squared difference of the L2-normalized maps (cqd's variant); beta 500
Before the key named its weight (files without `beta: null`), the default was beta 200 with `l1`: the
official code's distance at RepDistiller's weight; such files hold beta 200 and keep it.
The paper publishes neither the transforms' depth nor the weights; our choices, all keys of
`method.feed`:
  t_k       `depth` (3) layers of 3x3 conv + BN + LeakyReLU(0.1), FT's translator: the first
            depth - 1 keep the student's channels, the last maps to teacher k's; then a bilinear
            resize to F_k's size where the sizes differ (compression, other strides; `repdistiller` pools)
  beta      per teacher, the distance's reference weight (above), as FEED keeps FT's loss
  lam       0: the logit term off; > 0 adds the ensemble's term of method `ens` (T, scale as CQD)
  taps      `student_layer` and `teacher_layers` (one per teacher, null for the default): module
            paths, default each net's last feature map before pooling
The transforms train with the student and are in `last.ckpt`; `model.pt` holds only the student,
so test-time cost is the student's. `rounds: R` is sequential FEED: R students in turn, each round's
the next one's teacher (`cqd.experiments.rounds`).
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from cqd.errors import ConfigError
from cqd.methods import METHODS
from cqd.methods.base import Method, SequentialRounds
from cqd.methods.ens import EnsParams, ensemble_term
from cqd.models.taps import FeatureTaps, probe

# the weight of each distance's reference (FT's official code: 500; RepDistiller: 200); l2 has none, l1's is kept
REFERENCE_BETA = {"l1": 500.0, "repdistiller": 200.0, "l2": 500.0}
Distance = Literal["l1", "repdistiller", "l2"]
DISTANCE_HELP = ("l1: mean |a - b| of the L2-normalized maps (the official FT code's); repdistiller: of their "
                 "L2-normalized attention maps mean_c a^2 (RepDistiller's FT); l2: mean (a - b)^2 of the "
                 "normalized maps")
BETA_HELP = ("default (null): the distance's reference weight, 500 for l1 (the official FT code's) and l2, 200 "
             "for repdistiller")


class ReferenceBeta:
    """`weight`: `beta`, or the reference weight of `distance` where beta is null (a mixin of FT's and FEED's
    sections)."""

    @property
    def weight(self) -> float:
        return REFERENCE_BETA[self.distance] if self.beta is None else self.beta


class FEEDParams(ReferenceBeta, EnsParams):
    beta: float | None = Field(None, ge=0, description="weight of each teacher's feature loss; " + BETA_HELP)
    depth: int = Field(3, ge=1, le=8, description="conv-BN-LeakyReLU layers in each teacher's transform")
    distance: Distance = Field("l1", description=DISTANCE_HELP)
    student_layer: str | None = Field(None, description="student layer (module path); default: its last feature map")
    teacher_layers: list[str | None] = Field([], description="one layer per teacher (null: its last feature map); "
                                                             "default: all last feature maps")
    lam: float = Field(0.0, ge=0, description="weight of the ensemble's logit term (0: feature losses only)")
    rounds: int = Field(1, ge=1, le=10, description="sequential rounds: round r's teacher is round r-1's student "
                                                    "(1: one round)")

    def next_round(self, first: bool) -> FEEDParams:
        """This section for one round of several: round 1 keeps the teachers' taps; later rounds' one teacher
        has the student's architecture, so it is tapped at the student's layer."""
        return self.model_copy(update={"rounds": 1} if first else {"rounds": 1, "teacher_layers": [self.student_layer]})


def transform(cin: int, cout: int, depth: int) -> nn.Sequential:
    """`depth` layers of 3x3 conv + BN + LeakyReLU(0.1); the last one maps cin to cout channels."""
    layers = []
    for i in range(depth):
        out = cout if i == depth - 1 else cin
        layers += [nn.Conv2d(cin, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


def factor_distance(a: Tensor, b: Tensor, distance: str = "l1") -> Tensor:
    """l1: mean |a' - b'| (l2: (a' - b')^2) with a', b' the per-image flattened, L2-normalized maps, `a` resized
    to `b`'s size first (bilinear); repdistiller: mean |a' - b'| with a', b' the L2-normalized maps mean_c a^2,
    the larger map average-pooled to the smaller size first."""
    if distance == "repdistiller":
        size = tuple(min(u, v) for u, v in zip(a.shape[-2:], b.shape[-2:]))
        a, b = (f if tuple(f.shape[-2:]) == size else F.adaptive_avg_pool2d(f, size) for f in (a, b))
        return (F.normalize(a.float().pow(2).mean(1).flatten(1), dim=1)
                - F.normalize(b.float().pow(2).mean(1).flatten(1), dim=1)).abs().mean()
    d = F.normalize(resized(a, b).float().flatten(1), dim=1) - F.normalize(b.float().flatten(1), dim=1)
    return d.abs().mean() if distance == "l1" else d.pow(2).mean()


def resized(f: Tensor, like: Tensor) -> Tensor:
    if f.shape[-2:] == like.shape[-2:]:
        return f
    return F.interpolate(f, size=like.shape[-2:], mode="bilinear", align_corners=False)


@METHODS.register("feed")
class FEED(SequentialRounds, Method):
    Params = FEEDParams
    label = "FEED -> B feature ensemble"
    uses_teacher = True
    ensemble = True
    init_from_teacher = "if_same"

    def __init__(self, student, params=None, teachers=(), sample=None):
        super().__init__(student, params, teachers, sample)
        p = self.params
        layers = p.teacher_layers or [None] * len(teachers)
        if len(layers) != len(teachers):
            raise ConfigError(f"method.feed.teacher_layers has {len(layers)} entries but the run has {len(teachers)} "
                              f"teacher(s): give one per teacher (null for its last feature map) or none")
        self.layer, s_shape = probe(student, p.student_layer, sample, "method.feed.student_layer on the student")
        self.taps = FeatureTaps(student, [self.layer], "method.feed.student_layer on the student")
        self.guided, shapes = [], []
        for k, (model, layer) in enumerate(zip(teachers, layers)):
            name, shape = probe(model, layer, sample, f"method.feed.teacher_layers[{k}] on teacher {k}")
            self.guided.append(name)
            self.teacher_taps[k] = [name]
            shapes.append(shape)
        self.transforms = nn.ModuleList(transform(s_shape[1], t[1], p.depth) for t in shapes)

    def forward(self, step):
        p = self.params
        logits = self.student(step.pair.z)
        fs = self.taps.out[self.layer]
        losses = {"loss_ce": self.ce(logits, step.pair.y)}
        for k, (t, name) in enumerate(zip(self.transforms, self.guided)):
            target = step.teacher_features[k][name].detach()
            losses[f"loss_feed{k + 1}"] = p.weight * factor_distance(t(fs), target, p.distance)
        if p.lam:
            losses["loss_kd"] = ensemble_term(logits, step.teacher_logits, p)
        return logits, losses
