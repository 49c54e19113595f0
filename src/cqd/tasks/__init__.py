"""Tasks, registered like methods: `classification` (the paper's) and `sr` (super-resolution).

A new task is one package (or plugin module) with a `Task` subclass and `@TASKS.register(name)`; its
config section, datasets, pair maker, metrics, evaluation and report live there (see `base.Task`).
"""
from __future__ import annotations

from cqd.registry import Registry, import_modules
from cqd.tasks.base import Task

TASKS: Registry[type[Task]] = Registry("task")


def task_of(cfg) -> Task:
    """The task of a run config (`cfg.task`)."""
    return TASKS.get(cfg.task)()


import_modules(__name__, __path__, skip=("base",))

__all__ = ["TASKS", "Task", "task_of"]
