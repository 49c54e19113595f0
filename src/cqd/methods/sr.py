"""Super-resolution methods (task `sr`): the student g maps the LR input z to the HR target y (= x).

  sr_l1       L1(g(z), y): the student alone, no distillation (EDSR's loss)
  sr_teacher  the same loss; the method a teacher f without a checkpoint is trained with, and a grid
              row of it evaluates the shared teacher instead of training one
  sr_okd      output distillation: L1(g(z), y) + lam * L1(g(z), f(z))
  sr_fitnet   FitNet on body blocks: L1(g(z), y) + beta * mean over tapped pairs of MSE(r(F_s), F_t),
              r a trained 1x1 conv from the student's channels to the teacher's (no BatchNorm: EDSR has
              none, and a BN regressor would normalize away the scale FitNet asks the student to match)
  lsfd        local-selective feature distillation (`cqd.methods.lsfd`)
  sgn         SGN's per-sample mix of L1, LSGAN and these hints, g(z, c) (`cqd.methods.sgn`)

The teacher sees z, as the student does (SR distillation compresses a network; both get the LR image).
Tapped layers default to `points` evenly spaced body blocks of each network (`body.1` and `body.3` of
a 4-block student against `body.3` and `body.7` of an 8-block teacher); the maps have the same size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from cqd.errors import ConfigError
from cqd.methods import METHODS
from cqd.methods.base import Method
from cqd.models.taps import FeatureTaps, probe
from cqd.schema import Strict


class SRMethod(Method):
    uses_z = True
    init_from_teacher = "never"

    @staticmethod
    def l1(a: Tensor, b: Tensor) -> Tensor:
        return F.l1_loss(a.float(), b.float())


@METHODS.register("sr_l1")
class L1Alone(SRMethod):
    """g trained on (z, y) with L1 alone: the no-distillation baseline."""

    label = "student alone (L1)"

    def forward(self, step):
        out = self.student(step.pair.z)
        return out, {"loss_l1": self.l1(out, step.pair.y)}


@METHODS.register("sr_teacher")
class SRTeacher(L1Alone):
    """The teacher's own training (L1); in a grid, a row of this method evaluates the shared f."""

    label = "teacher (L1)"


class OKDParams(Strict):
    lam: float = Field(1.0, ge=0, description="weight of L1(g(z), f(z)) beside L1(g(z), y)")


@METHODS.register("sr_okd")
class OutputKD(SRMethod):
    """Output distillation: the teacher's SR image as a second target."""

    Params = OKDParams
    label = "output KD"
    uses_teacher = True

    def forward(self, step):
        out = self.student(step.pair.z)
        return out, {"loss_l1": self.l1(out, step.pair.y),
                     "loss_kd": self.params.lam * self.l1(out, step.teacher_logits[0].detach())}


class FeatureParams(Strict):
    beta: float = Field(1.0, ge=0, description="weight of the feature term")
    student_layers: list[str] | None = Field(None, description="student module paths; "
                                                              "default: `points` evenly spaced body blocks")
    teacher_layers: list[str] | None = Field(None, description="teacher module paths, one per student layer; "
                                                              "default as the student's")
    points: int = Field(2, ge=1, description="number of evenly spaced body blocks tapped when the layers are not given")


def body_blocks(model: nn.Module) -> list[str]:
    """`body.0`, `body.1`, ...: the residual blocks of an EDSR-style network."""
    return [n for n, _ in model.named_modules() if n.startswith("body.") and n.count(".") == 1 and n[5:].isdigit()]


def evenly_spaced(model: nn.Module, points: int, what: str) -> list[str]:
    blocks = body_blocks(model)
    if len(blocks) < points:
        raise ConfigError(f"{what}: {points} evenly spaced body blocks asked, but the network has {len(blocks)} "
                          f"({', '.join(blocks) or 'no body.N blocks'}); lower `points` or name the layers")
    return [blocks[round((j + 1) * len(blocks) / points) - 1] for j in range(points)]


def hints(student: nn.Module, teacher: nn.Module, p: FeatureParams, sample: Tensor, name: str
          ) -> tuple[list[tuple[str, str]], nn.ModuleList, FeatureTaps]:
    """FitNet's parts for `p`'s layers: the (student, teacher) layer pairs, one 1x1 conv regressor per pair
    from the student's channels to the teacher's, and the taps on the student (`name`: the config section)."""
    s_layers = p.student_layers or evenly_spaced(student, p.points, f"method.{name}.student_layers")
    t_layers = p.teacher_layers or evenly_spaced(teacher, len(s_layers), f"method.{name}.teacher_layers")
    if len(s_layers) != len(t_layers):
        raise ConfigError(f"method.{name}: {len(s_layers)} student layers but {len(t_layers)} teacher layers; "
                          "give one teacher layer per student layer")
    regressors = []
    for s, t in zip(s_layers, t_layers):
        _, s_shape = probe(student, s, sample, f"method.{name}.student_layers on the student")
        _, t_shape = probe(teacher, t, sample, f"method.{name}.teacher_layers on the teacher")
        if s_shape[-2:] != t_shape[-2:]:
            raise ConfigError(f"method.{name}: student layer {s} gives {tuple(s_shape[-2:])} maps but teacher layer "
                              f"{t} gives {tuple(t_shape[-2:])}; tap layers of the same resolution (the body blocks)")
        regressors.append(nn.Conv2d(s_shape[1], t_shape[1], 1))
    taps = FeatureTaps(student, s_layers, f"method.{name}.student_layers on the student")
    return list(zip(s_layers, t_layers)), nn.ModuleList(regressors), taps


class FeatureDistiller(SRMethod):
    """L1(g(z), y) + beta * mean over the tapped pairs of `feature_loss(r_k(F_s,k), F_t,k)`; r_k a trained
    1x1 conv to the teacher's channels (owned by the method, so optimized and checkpointed, and dropped
    from model.pt). Subclasses define `feature_loss`."""

    Params = FeatureParams
    uses_teacher = True

    def __init__(self, student, params=None, teachers=(), sample=None):
        super().__init__(student, params, teachers, sample)
        self.pairs, self.regressors, self.taps = hints(student, teachers[0], self.params, sample, self.section)
        self.teacher_taps[0] = [t for _, t in self.pairs]

    section = ""

    def feature_loss(self, fs: Tensor, ft: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, step):
        out = self.student(step.pair.z)
        maps = step.teacher_features[0]
        # stacked (not torch.tensor([...]), which would detach them): the term's gradient reaches g and r
        terms = torch.stack([self.feature_loss(r(self.taps.out[s]).float(), maps[t].detach().float())
                             for r, (s, t) in zip(self.regressors, self.pairs)])
        return out, {"loss_l1": self.l1(out, step.pair.y), "loss_feat": self.params.beta * terms.mean()}


@METHODS.register("sr_fitnet")
class FitNetSR(FeatureDistiller):
    """FitNet's hint loss on whole maps: mean squared error of r(F_s) and F_t."""

    label = "FitNet"
    section = "sr_fitnet"

    def feature_loss(self, fs, ft):
        return F.mse_loss(fs, ft)
