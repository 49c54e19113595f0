"""The task of a run (`task:` in the config): the one seam where the engine differs between tasks.

A task says how to build its datasets and pair maker, how to evaluate (the metrics of an epoch),
which name a model is built under, which method trains a teacher when it has no checkpoint, what
the teacher sees, and which metrics `result.json` carries. The training loop, checkpoints, methods,
teachers and grids are shared.

- `classification` (the paper's): top-1 on x and z; f is trained by method `hq` on x and sees x.
- `sr` (super-resolution, `cqd.engine.sr`): PSNR/SSIM on whole images; f is trained by method
  `sr_teacher` (L1) and sees the LR input z, as the student does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Task:
    name: str
    build_datasets: Callable  # cfg -> (train, test, base_train, base_test)
    make_maker: Callable  # (cfg, base[, hq_view, hq_degradation]) -> pair maker
    evaluate: Callable  # (models, views, loader, maker, fabric) -> {metric: value}
    model_name: Callable  # (cfg, name) -> the name the network is built (and saved) under
    teacher_method: str  # trains a teacher without a checkpoint; a grid row of this method evaluates f
    teacher_input: Callable  # pair -> the teacher's input
    metrics: tuple[str, ...]  # the final epoch's metrics copied into result.json
    teacher_run: Callable = lambda cfg, tcfg: None  # adjusts a teacher's own run config
    fixes_twins: bool = True  # z is made once per item before training (classification's degradations)
    describe: Callable = lambda cfg: {"degradation": cfg.data.degradation}  # what `cqd eval` names beside its metrics


def _classification() -> Task:
    from cqd.engine import classification, loaders

    return Task("classification", loaders.build_datasets, lambda *a: loaders.make_maker(*a), classification.evaluate,
                lambda cfg, name: name, "hq", lambda pair: pair.x, ("acc_hq", "acc_lq", "val_acc_hq", "val_acc_lq"))


def _sr() -> Task:
    from cqd.engine import sr

    return Task("sr", sr.build_datasets, sr.make_maker, sr.evaluate, sr.model_name, "sr_teacher",
                lambda pair: pair.z, sr.METRICS, sr.teacher_run, fixes_twins=False,
                describe=lambda cfg: {"scale": cfg.sr.scale, "test": cfg.sr.test})


TASKS = {"classification": _classification, "sr": _sr}


def task_of(cfg) -> Task:
    """The task of a run config (`cfg.task`, classification for configs without the key)."""
    return TASKS[getattr(cfg, "task", "classification")]()


def result_of(cfg, metrics: dict) -> dict:
    """The task's metrics out of a dict of an evaluation's values (those it has)."""
    return {k: metrics[k] for k in task_of(cfg).metrics if k in metrics}
