"""The poster's quality predictor: a 2-class classifier, 0 = high quality x, 1 = low quality z = T(x).

Trained through the engine like any method (the multi-resolution analysis routes each test image
by it); its acc_hq / acc_lq are the shares of x and of z it labels correctly.
"""
from __future__ import annotations

import torch

from cqd.methods import METHODS
from cqd.methods.base import Method


@METHODS.register("quality")
class QualityPredictor(Method):
    label = "quality predictor (0 = x, 1 = z)"

    @classmethod
    def num_outputs(cls, num_classes: int, params=None) -> int:
        return 2

    def forward(self, step):
        pair = step.pair
        logits = self.student(torch.cat([pair.x, pair.z]))
        labels = torch.arange(2, device=logits.device).repeat_interleave(len(pair))
        return logits, {"loss_ce": self.ce(logits, labels)}

    @classmethod
    def eval_views(cls, pair):
        zeros = torch.zeros_like(pair.y)
        return {"hq": (pair.x, zeros), "lq": (pair.z, zeros + 1)}
