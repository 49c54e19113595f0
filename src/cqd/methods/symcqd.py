"""Quality-conditioned CQD: one student g(z_c, c) for every mix c of K degradations, and the c regressor.

`symcqd`: Eq. 1 on blends. With `data.mix` each pair's z is z_c = sum_k c_k T_k(x) and carries c
(`data/blend.py`); the student is the run's model with sym gates (`models/sym.py`) that see c, and learns
CE(g(z_c, c), y) + lambda * CE_T(g(z_c, c), f(x)). At test time c is given, or predicted by `quality_mix`.
g starts from f where the architectures match (the gates start as identities, so g(., c) = f at the start).

`quality_mix`: the multi-resolution analysis's quality predictor (method `quality`), regressing c instead of
classifying x vs z: a K-way net whose softmax p(z_c) is trained towards c with the soft cross-entropy
-sum_k c_k log p_k (minimal exactly at p = c; the softmax keeps the prediction on the simplex). Logged as
`loss_c` = KL(c || p), the same gradient, 0 when p = c. Its acc_lq is the share of test blends whose
dominant degradation (argmax c) it names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from cqd.errors import CQDError
from cqd.methods import METHODS
from cqd.methods.base import Method, fp32
from cqd.methods.cqd import KDParams, kd_term
from cqd.models.sym import sym_net
from cqd.schema import Strict


class SymParams(KDParams):
    k: int | None = Field(None, ge=1, description="K, the number of mixed degradations; "
                                                  "default (null): len(data.mix.degradations)")
    layers: list[str] | None = Field(None, description="module paths gated by c; "
                                                       "default: each resolution stage's output")
    embed: int = Field(16, ge=1, description="width of the c embedding ReLU(Linear(c)) in each gate")
    reduction: int = Field(4, ge=1, description="SE bottleneck: a gate's hidden width is max(C // reduction, 4)")


def _c_of(step, k: int, name: str) -> torch.Tensor:
    c = step.pair.c
    if c is None or c.shape[1] != k:
        raise CQDError(f"method {name!r} needs the mix c of each sample (K={k}) in the batch: set data.mix "
                       f"(got {'no c' if c is None else f'c of {c.shape[1]} components'})")
    return c


@METHODS.register("symcqd")
class SymCQD(Method):
    """g(z_c, c) learns on blends from the labels and from f's predictions on the paired x."""

    Params = SymParams
    label = "sym-parameter CQD: g(z_c, c)"
    uses_teacher = True
    init_from_teacher = "if_same"
    mix_conditioned = True

    def __init__(self, student, params=None, teachers=(), sample=None):
        super().__init__(student, params, teachers, sample)
        p = self.params
        if p.k is None:
            raise CQDError("method symcqd needs K: set data.mix (K follows it) or method.symcqd.k")
        if sample is None:
            raise CQDError("method symcqd sizes its gates on a sample batch; none was given")
        self.student = sym_net(student, p.k, p.layers, sample, p.embed, p.reduction)

    def forward(self, step):
        logits = self.student(step.pair.z, _c_of(step, self.params.k, "symcqd"))
        return logits, {"loss_ce": self.ce(logits, step.pair.y),
                        "loss_kd": kd_term(logits, step.teacher_logits, self.params)}

    @classmethod
    def eval_views(cls, pair):
        """z_c with its c (acc_lq), and x with the same c (acc_hq; x is no mix, so this only tracks f's view)."""
        return {"hq": ((pair.x, pair.c), pair.y), "lq": ((pair.z, pair.c), pair.y)}


@torch.no_grad()
def predict_mix(regressor: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """c_hat = softmax(h(z)): the regressor's estimate of each image's mix, a (B, K) batch on the simplex."""
    return torch.softmax(regressor(z).float(), 1)


def conditioned_logits(student: torch.nn.Module, z: torch.Tensor, c: torch.Tensor | None = None,
                       regressor: torch.nn.Module | None = None) -> torch.Tensor:
    """g(z, c) at test time: c given, or predicted from z by a `quality_mix` regressor."""
    if c is None:
        if regressor is None:
            raise CQDError("give the mix c of the images, or a quality_mix regressor that predicts it")
        c = predict_mix(regressor, z)
    return student(z, c.to(z.device))


class QualityMixParams(Strict):
    k: int | None = Field(None, ge=1, description="K, the number of mixed degradations; "
                                                  "default (null): len(data.mix.degradations)")


def soft_target_kl(logits: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(c || softmax(logits)) = -sum c log p - H(c): the soft cross-entropy less c's
    entropy."""
    c = c.float()
    return (torch.xlogy(c, c) - c * F.log_softmax(fp32(logits), 1)).sum(1).mean()


@METHODS.register("quality_mix")
class QualityMix(Method):
    """Predicts the mix c of a blend z_c: p = softmax(h(z_c)) trained towards c."""

    Params = QualityMixParams
    label = "quality regressor: c from z_c"
    mix_conditioned = True

    @classmethod
    def num_outputs(cls, num_classes: int, params=None) -> int:
        if params is None or params.k is None:
            raise CQDError("method quality_mix predicts K mix weights: set data.mix (K follows it) "
                           "or method.quality_mix.k")
        return params.k

    def forward(self, step):
        logits = self.student(step.pair.z)
        return logits, {"loss_c": soft_target_kl(logits, _c_of(step, self.params.k, "quality_mix"))}

    @classmethod
    def eval_views(cls, pair):
        """Top-1 here is the share of blends whose dominant degradation argmax c is predicted."""
        if pair.c is None:
            raise CQDError("method quality_mix is evaluated on blends: set data.mix")
        return {"lq": (pair.z, pair.c.argmax(1))}
