"""Factor transfer (Kim, Park, Kwak, "Paraphrasing Complex Network", NeurIPS 2018), the base of FEED.

A paraphraser P (encoder E, decoder D) is first trained to reconstruct the teacher's feature map,
min mean (D(E(F_t)) - F_t)^2; its encoder gives the teacher factor E(F_t). A translator t on the
student gives the student factor, trained with the student:

    CE(g(z), y) + beta * d(t(F_s), E(F_t)) [+ lambda * KL to the teachers' softened predictions]

d is `feed`'s distance: by default (`distance: l1`) the official FT code's (Jangho-Kim/Factor-Transfer-pytorch:
per-image flattened, L2-normalized factors, mean |a - b|) at that code's weight, beta 500; `distance:
repdistiller` is RepDistiller's (L2-normalized attention maps mean_c a^2 of the factors) at its weight, 200
(`beta` given: that weight instead). Files written before the weight followed the distance hold beta 200 (the
official distance at RepDistiller's weight) and keep it. Uses the first teacher. Our choices where the paper
leaves room, all keys of `method.ft`:
  E, D, t   E = 3 conv-BN-LeakyReLU layers from the teacher's channels C_t to round(rate * C_t)
            (rate 0.5, the paper's paraphrase rate), D = 3 such layers back to C_t, t = FEED's
            transform with `depth` layers to the factor's channels; a bilinear resize where sizes differ
  stage     `paraphraser_epochs` (10) epochs of Adam (lr `paraphraser_lr`, 1e-3) over the teacher's
            maps of the training items (in index order, 2 x train.batch_size a batch), before the
            student's training; P is frozen after it (eval mode, no gradient)
  cache     the trained P is kept in `cache_dir/paraphraser-<key>.pt`, keyed by the teacher cache's key
            (teacher weights, data, teacher view, precision) and these settings: trained once per
            teacher and reused by every run (any student, seed or method setting) that shares them
The engine runs the stage through `Teachers.pretrain`, which calls `pretrain` below with the maps.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cqd.files import load_checkpoint, save_checkpoint
from cqd.methods import METHODS
from cqd.methods.base import Method, SequentialRounds
from cqd.methods.ens import EnsParams, ensemble_term
from cqd.methods.feed import BETA_HELP, DISTANCE_HELP, Distance, ReferenceBeta, factor_distance, transform
from cqd.models.taps import FeatureTaps, probe


class FTParams(ReferenceBeta, EnsParams):
    beta: float | None = Field(None, ge=0, description="weight of the factor loss; " + BETA_HELP)
    rate: float = Field(0.5, gt=0, le=4, description="paraphrase rate: "
                                                     "factor channels = round(rate * teacher channels)")
    depth: int = Field(3, ge=1, le=8, description="conv-BN-LeakyReLU layers of the translator")
    paraphraser_epochs: int = Field(10, ge=1, description="epochs of the paraphraser's own training stage")
    paraphraser_lr: float = Field(1e-3, gt=0, description="Adam's lr in that stage")
    distance: Distance = Field("l1", description=DISTANCE_HELP)
    student_layer: str | None = Field(None, description="student layer (module path); default: its last feature map")
    teacher_layer: str | None = Field(None, description="teacher layer (module path); default: its last feature map")
    lam: float = Field(0.0, ge=0, description="weight of the logit term (0: factor loss only)")
    rounds: int = Field(1, ge=1, le=10, description="sequential rounds: round r's teacher is round r-1's student "
                                                    "(1: one round)")

    def next_round(self, first: bool) -> FTParams:
        """This section for one round of several: round 1 keeps the teacher's tap; later rounds' teacher
        has the student's architecture, so it is tapped at the student's layer."""
        return self.model_copy(update={"rounds": 1} if first else {"rounds": 1, "teacher_layer": self.student_layer})


class Paraphraser(nn.Module):
    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.encoder, self.decoder = transform(channels, factor, 3), transform(factor, channels, 3)

    def forward(self, f):
        return self.decoder(self.encoder(f))


@METHODS.register("ft")
class FactorTransfer(SequentialRounds, Method):
    Params = FTParams
    label = "FT -> B factor transfer"
    uses_teacher = True
    init_from_teacher = "if_same"
    pretrains = True

    def __init__(self, student, params=None, teachers=(), sample=None):
        super().__init__(student, params, teachers, sample)
        p = self.params
        self.layer, s_shape = probe(student, p.student_layer, sample, "method.ft.student_layer on the student")
        self.guided, t_shape = probe(teachers[0], p.teacher_layer, sample, "method.ft.teacher_layer on the teacher")
        self.taps = FeatureTaps(student, [self.layer], "method.ft.student_layer on the student")
        self.teacher_taps[0] = [self.guided]
        factor = max(1, round(p.rate * t_shape[1]))
        self.translator = transform(s_shape[1], factor, p.depth)
        with torch.random.fork_rng(devices=[]):  # P's init, like its cache key, does not depend on the run's seed
            torch.manual_seed(0)
            self.paraphraser = Paraphraser(t_shape[1], factor).eval().requires_grad_(False)

    def pretrain(self, k, maps, key, cache_dir, log) -> None:
        """The paraphraser's stage (the engine calls it for the one tapped teacher, k = 0): loaded from
        the cache, or trained on the teacher's maps and cached."""
        p = self.params
        settings = {"key": key, "layer": self.guided, "rate": p.rate, "epochs": p.paraphraser_epochs,
                    "lr": p.paraphraser_lr}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"paraphraser-{digest}.pt"
        if path.is_file():
            self.paraphraser.load_state_dict(load_checkpoint(path)["paraphraser"])
            log(f"paraphraser: cache hit ({path})")
            return
        P = self.paraphraser.to(next(self.student.parameters()).device).train().requires_grad_(True)
        opt = torch.optim.Adam(P.parameters(), lr=p.paraphraser_lr)
        with torch.enable_grad():
            for _ in range(p.paraphraser_epochs):
                for m in maps():
                    f = m[self.guided].float()
                    loss = F.mse_loss(P(f), f)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        P.eval().requires_grad_(False)
        save_checkpoint({"paraphraser": {n: t.cpu() for n, t in P.state_dict().items()}, "settings": settings,
                         "reconstruction_mse": float(loss.detach())}, path)
        log(f"paraphraser: trained {p.paraphraser_epochs} epochs (reconstruction MSE {float(loss.detach()):.4g}), "
            f"cached in {path}")

    def train(self, mode: bool = True):
        super().train(mode)
        self.paraphraser.eval()  # frozen: its BatchNorm statistics stay the stage's
        return self

    def forward(self, step):
        p = self.params
        logits = self.student(step.pair.z)
        with torch.no_grad():
            target = self.paraphraser.encoder(step.teacher_features[0][self.guided].float())
        losses = {"loss_ce": self.ce(logits, step.pair.y),
                  "loss_ft": p.weight * factor_distance(self.translator(self.taps.out[self.layer]), target,
                                                        p.distance)}
        if p.lam:
            losses["loss_kd"] = ensemble_term(logits, step.teacher_logits, p)
        return logits, losses
