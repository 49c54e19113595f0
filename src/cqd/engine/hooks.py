"""What runs beside the loop, at its named points (the `fabric.call` style of Lightning's build-your-own-trainer
example): the loop calls `hooks.call("on_epoch_end", ...)` and every hook that defines the point answers.

Points, in the order a run meets them:
  on_student(run, student, sample)   g is built (and started from f), before the method sizes its parts to it
  on_method(run, method)             the method exists, before the optimizers
  on_fit_start(run)                  the loop starts (or resumes)
  on_epoch_start(run, epoch, step)   an epoch starts at `step`
  on_step_end(run)                   after each optimizer step (no device values: the loop reads those)
  on_steps_done(run, epoch)          the epoch's steps are done
  on_check(run, values)              every `train.check_every` steps and at each epoch's end: what was read
  on_before_evaluate(run, epoch)     before an epoch's evaluation
  on_epoch_end(run, epoch) -> bool   after it; True when the student changed (the optimizers are rebuilt)
  on_epoch_logged(run, row)          the epoch's metrics row, after its checkpoint
  record(run) -> dict                what the hook adds to checkpoints, result.json and model.pt
  on_fit_end(run)                    always, last
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from cqd.files import save_json, save_text


class Hook:
    """A hook answers the points it defines; the rest are these no-ops."""

    def on_student(self, run, student, sample) -> None: ...
    def on_method(self, run, method) -> None: ...
    def on_fit_start(self, run) -> None: ...
    def on_epoch_start(self, run, epoch: int, step: int) -> None: ...
    def on_step_end(self, run) -> None: ...
    def on_check(self, run, values: dict) -> None: ...
    def on_steps_done(self, run, epoch: int) -> None: ...
    def on_before_evaluate(self, run, epoch: int) -> None: ...

    def on_epoch_end(self, run, epoch: int) -> bool:
        return False

    def on_epoch_logged(self, run, row: dict) -> None: ...

    def record(self, run) -> dict:
        return {}

    def on_fit_end(self, run) -> None: ...


class Hooks(list):
    def call(self, point: str, *args) -> list:
        """Every hook's answer at `point`, in order."""
        return [getattr(hook, point)(*args) for hook in self]

    def record(self, run) -> dict:
        return {k: v for hook in self for k, v in hook.record(run).items()}


class Compression(Hook):
    """`compress:`: prune g before the method sizes its parts, QAT after, a pruning step after each iterative epoch,
    BatchNorm re-estimated before the last evaluation; `compress` in every file the run writes."""

    def __init__(self, compressor):
        self.compressor = compressor

    def on_student(self, run, student, sample) -> None:
        self.compressor.before_method(student, sample)

    def on_method(self, run, method) -> None:
        self.compressor.after_method(method)

    def on_before_evaluate(self, run, epoch: int) -> None:
        if epoch + 1 == run.cfg.train.epochs:  # a compressed g's BatchNorm statistics, re-estimated once at the end
            self.compressor.recalibrate(run.method.student)

    def on_epoch_end(self, run, epoch: int) -> bool:
        return self.compressor.on_epoch_end(run.method, epoch)

    def record(self, run) -> dict:
        return {"compress": self.compressor.record()}


class MetricsLog(Hook):
    """config.json at the start, then each epoch's row in metrics.csv and TensorBoard (rank 0 only)."""

    def __init__(self, out: Path):
        self.out, self.writer = out, None

    def on_fit_start(self, run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        save_json(run.cfg.model_dump(), self.out / "config.json")
        self.writer = SummaryWriter(str(self.out / "tb"))

    def on_epoch_logged(self, run, row: dict) -> None:
        for k, v in row.items():
            self.writer.add_scalar(k, v, row["epoch"])
        write_csv(run.history, self.out / "metrics.csv")

    def on_fit_end(self, run) -> None:
        if self.writer:
            self.writer.close()


class ProgressBar(Hook):
    """tqdm's bar per epoch; its loss and images/s are the values the loop read at its last check."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def on_epoch_start(self, run, epoch: int, step: int) -> None:
        from tqdm import tqdm

        self.t0 = time.perf_counter()
        desc = f"{run.cfg.name} epoch {epoch + 1}/{run.cfg.train.epochs}"
        self.bar = tqdm(total=run.steps_per_epoch, initial=step, desc=desc, disable=not self.enabled, leave=False,
                        dynamic_ncols=True)

    def on_step_end(self, run) -> None:
        self.bar.update(1)

    def on_check(self, run, values: dict) -> None:
        if self.bar is not None and "loss" in values:
            rate = run.n_new * run.fabric.world_size / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{rate:.0f}")

    def on_steps_done(self, run, epoch: int) -> None:
        self.bar.close()

    def on_fit_end(self, run) -> None:
        if self.bar is not None:
            self.bar.close()


def write_csv(history: list[dict], path: Path) -> None:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    save_text(buf.getvalue(), path)
