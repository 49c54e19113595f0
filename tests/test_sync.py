"""The step loop never waits for the device between its check points: the loss sums and the non-finite flags
stay on the device and are read every `train.check_every` steps, at each epoch's end and before a checkpoint.
Counted here on the CPU by spying on every read of a tensor's value made from the loop's own files."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import cqd.engine
from cqd.engine.trainer import train
from cqd.errors import TrainingDiverged
from cqd.files import load_checkpoint
from cqd.methods.supervised import TrainOnB
from helpers import tiny_cfg

LOOP_FILES = {str(Path(cqd.engine.__file__).parent / f) for f in ("trainer.py", "hooks.py", "signals.py")}
READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def spy_reads(monkeypatch) -> list[str]:
    """Every read of a tensor's value called from the loop's files, as 'file:line' of the caller."""
    seen = []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller in LOOP_FILES:
                seen.append(f"{Path(caller).name}:{sys._getframe(1).f_lineno}")
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return seen


def steps_cfg(tmp_path, steps: int, check_every: int, **over) -> dict:
    return tiny_cfg(tmp_path, "run", method__name="lq", data__train_subset=steps * 2, train__batch_size=2,
                    train__max_steps_per_epoch=None, train__check_every=check_every, **over)


@pytest.mark.parametrize("check_every", [10, 25])
def test_100_steps_read_the_device_once_per_check(tmp_path, monkeypatch, check_every):
    seen = spy_reads(monkeypatch)
    res = train(steps_cfg(tmp_path / str(check_every), 100, check_every))
    assert len(res["history"]) == 1
    # 100 / check_every checks, the end-of-epoch check and the epoch's loss means: nothing per step
    assert len(seen) <= 100 // check_every + 2, seen


def test_a_nan_at_step_37_is_reported_in_its_window_and_the_checkpoint_left_is_finite(tmp_path, monkeypatch):
    real, n = TrainOnB.forward, [0]

    def forward(self, step):
        n[0] += 1
        logits, losses = real(self, step)
        if n[0] == 50 + 37:  # epoch 2 (of 50 steps each), step 37
            losses = {**losses, "loss_ce": losses["loss_ce"] * float("nan")}
        return logits, losses

    monkeypatch.setattr(TrainOnB, "forward", forward)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2 step 37 \(non-finite term: loss_ce\)"):
        train(steps_cfg(tmp_path, 50, 25, train__epochs=2))
    assert n[0] == 50 + 50, "the NaN is found at the next check (step 50 of epoch 2), not later"
    ck = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_the_checks_are_not_free_to_skip(tmp_path, monkeypatch):
    """The end-of-epoch check still sees a NaN of the last steps (after the last periodic check)."""
    real, n = TrainOnB.forward, [0]

    def forward(self, step):
        n[0] += 1
        logits, losses = real(self, step)
        return logits, ({**losses, "loss_ce": losses["loss_ce"] * math.inf} if n[0] == 9 else losses)

    monkeypatch.setattr(TrainOnB, "forward", forward)
    with pytest.raises(TrainingDiverged, match=r"loss became inf at epoch 1 step 9 "):
        train(steps_cfg(tmp_path, 10, 8))
    assert not (tmp_path / "run" / "last.ckpt").exists() and not (tmp_path / "run" / "model.pt").exists()
