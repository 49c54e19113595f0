"""What the engine asks of a task: the one seam where runs of different tasks differ.

A task is a package in `cqd/tasks/` (or a plugin module, see `cqd.plugins`) with a `Task` subclass
registered under its name (`@TASKS.register("sr")`). It says how to build its datasets and pair maker,
how to evaluate (the metrics of an epoch), which name a model is built under, which method trains a
teacher that has no checkpoint, what the teacher sees, which metrics `result.json` and `cqd eval`
show, its own config section (named after the task) and the module that writes a grid's report. The
training loop, checkpoints, methods, teachers and grids are shared.
"""
from __future__ import annotations

from typing import Any, ClassVar

from cqd.errors import ConfigError
from cqd.schema import Strict


class Task:
    name: ClassVar[str] = ""  # set by TASKS.register
    Config: ClassVar[type[Strict] | None] = None  # the section `<task name>:` of a run config (None: no section)
    teacher_method: ClassVar[str] = "hq"  # trains a teacher without a checkpoint; a grid row of it evaluates f
    metrics: ClassVar[tuple[str, ...]] = ()  # the final epoch's metrics copied into result.json
    eval_keys: ClassVar[tuple[str, ...]] = ()  # what `cqd eval` prints (from its result)
    fixes_twins: ClassVar[bool] = True  # z is made once per item before training when x is fixed
    compressible: ClassVar[bool] = False  # `compress:` (pruning, QAT) is written for this task's outputs
    teacher_logits: ClassVar[bool] = False  # f gives class logits (`teacher.calibrate` scales them)
    report: ClassVar[str] = ""  # module with write_report(cells, grid, out) -> (markdown, summary): a grid's table
    legacy_digest: ClassVar[dict] = {}  # settings earlier versions hashed into this task's shared-teacher folder names

    def build_datasets(self, cfg) -> tuple[Any, Any, Any, Any]:
        """(train, test, base_train, base_test): the items trained and tested on, and the full splits."""
        raise NotImplementedError

    def val_dataset(self, cfg, base_train):
        """Validation items held out of training (None: none)."""
        return None

    def make_maker(self, cfg, base, hq_view: str | None = None, hq_degradation: str | None = None):
        """The pair maker: a batch of items -> `Pair` (x, z, y, ...) on the device. With `hq_view` /
        `hq_degradation`, one that makes a teacher's own x."""
        raise NotImplementedError

    def evaluate(self, models: dict, views, loader, maker, fabric) -> dict[str, float]:
        """The metrics of every network in `models` ('' is the student) over `loader`, synced across ranks."""
        raise NotImplementedError

    def model_name(self, cfg, name: str) -> str:
        """The name the network is built (and saved) under."""
        return name

    def teacher_input(self, pair):
        """What f sees when it has no maker of its own."""
        return pair.x

    def teacher_run(self, cfg, tcfg) -> None:
        """Adjusts a teacher's own run config (e.g. its epochs)."""

    def describe(self, cfg) -> dict:
        """What `cqd eval` names beside its metrics."""
        return {}

    def at_mix(self, model, ck: dict, c, path) -> tuple[Any, Any]:
        """(the model to evaluate, the mix c it runs at) for a network conditioned on a mix c (`cqd eval --c`):
        by default c comes with the data, and a c given here is refused."""
        if c is not None:
            raise ConfigError(f"{path}: a model of task {self.name!r} takes its mix from the data, not from c")
        return model, None

    def progress(self, res: dict) -> str:
        """A finished grid cell's scores, as `cqd table` prints them."""
        return " ".join(f"{k}={res[k]:.4g}" for k in self.eval_keys if isinstance(res.get(k), (int, float)))

    def result(self, metrics: dict) -> dict:
        """The task's metrics out of an evaluation's values (those it has)."""
        return {k: metrics[k] for k in self.metrics if k in metrics}
