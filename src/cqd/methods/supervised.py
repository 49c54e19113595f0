"""The paper's baselines: train on A, on B, on A+B, and staged A then B (section 4, Methods 1-4)."""
from __future__ import annotations

import torch

from cqd.methods import METHODS
from cqd.methods.base import Method


@METHODS.register("hq")
class TrainOnA(Method):
    """A: train on the high-quality view x. This is the teacher f and the upper bound (A->A)."""

    label = "A -> A upper bound"
    table_lines = (("A -> A upper bound", "acc_hq"), ("A -> B no adaptation", "acc_lq"))
    uses_z = False

    def forward(self, step):
        logits = self.student(step.pair.x)
        return logits, {"loss_ce": self.ce(logits, step.pair.y)}


@METHODS.register("lq")
class TrainOnB(Method):
    """B: fine-tune on the low-quality view z only."""

    label = "B -> B fine-tuning"

    def forward(self, step):
        logits = self.student(step.pair.z)
        return logits, {"loss_ce": self.ce(logits, step.pair.y)}


@METHODS.register("augment")
class TrainOnAB(Method):
    """A+B: data augmentation, one batch holds both x and z with their labels."""

    label = "A+B -> B data augment."

    def forward(self, step):
        pair = step.pair
        logits = self.student(torch.cat([pair.x, pair.z]))
        return logits[len(pair):], {"loss_ce": self.ce(logits, torch.cat([pair.y, pair.y]))}


@METHODS.register("staged")
class Staged(TrainOnB):
    """A,B: staged training, start from the model trained on A, then fine-tune on B."""

    label = "A,B -> B staged training"
    init_from_teacher = "always"
