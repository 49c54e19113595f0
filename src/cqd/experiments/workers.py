"""What the executors other than local run in their workers (Ray's tasks, submitit's jobs): a grid's cell
(`run_one`: the local executor's `run_cell`), a study's teachers and its trial workers; and what they share: a task
(`Task`), its outcome across processes (`guarded`, `outcome`), the package an executor needs (`need`)."""
from __future__ import annotations

import importlib
import os
import site
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cqd.errors import ConfigError, CQDError
from cqd.experiments.executor_config import EXTRAS
from cqd.experiments.grid import run_cell
from cqd.experiments.schema import tune_config
from cqd.experiments.tune import shared_teachers, work
from cqd.files import save_json

EXECUTOR_JSON = "executor.json"  # in a cell's folder: each attempt of a Ray or SLURM executor to run it


class CellFailed(CQDError):
    """A cell (or study worker) that its executor could not finish: its worker or job died every time."""


def need(executor: str):
    """The package an executor runs on (imported), or a ConfigError naming the extra to install."""
    package, extra = EXTRAS[executor]
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ConfigError(f"executor {executor!r} needs the Python package {package!r}, which cannot be imported "
                          f"({e}): install it with `pip install 'cqd-distill[{extra}]'` (in a checkout: `pip install "
                          f"-e '.[{extra}]'`), or run with executor.name=local") from None


@contextmanager
def importable():
    """Processes started inside (Ray's workers, submitit's jobs: they inherit this environment) import this cqd, even
    one that is not installed (a checkout on PYTHONPATH)."""
    src = str(Path(__file__).resolve().parents[2])  # the folder that holds the package cqd
    old = os.environ.get("PYTHONPATH")
    if src in site.getsitepackages() or src in (old or "").split(os.pathsep):
        yield
        return
    os.environ["PYTHONPATH"] = os.pathsep.join([src, *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@dataclass
class Task:
    """One unit of work: `fn(*args)` in a worker, after the tasks named in `after`."""

    name: str
    fn: Callable
    args: tuple
    after: tuple[str, ...] = ()


def guarded(fn: Callable, args: tuple, *after) -> tuple:
    """`fn(*args)` in a worker, as ("ok", value), or ("error", message) for a CQDError (its message crosses
    processes, not the exception object); skipped when a task it comes after failed (`after`: their outcomes)."""
    if any(a[0] != "ok" for a in after):
        return ("error", "not run: a task it needs failed")
    try:
        return ("ok", fn(*args))
    except CQDError as e:
        return ("error", str(e))


def outcome(name: str, out: tuple) -> Any:
    """The value of a task's `guarded` outcome, or its error raised as a CellFailed naming the task."""
    if out[0] != "ok":
        raise CellFailed(f"{name}: {out[1]}")
    return out[1]


def run_one(spec: dict, poll_s: float = 5.0) -> dict:
    """One cell in a Ray task or a SLURM job: `run_cell`, as the local executor runs it, with `spec["threads"]` torch
    threads; waits while another live process holds the cell. Each attempt that runs it is recorded in the cell's
    executor.json (executor, host, pid, CUDA_VISIBLE_DEVICES, threads, start, end). Returns the cell's result."""
    import torch

    from cqd.engine.schema import run_config
    from cqd.files import load_json

    torch.set_num_threads(spec["threads"])
    cfg = run_config(spec["config"])
    path, attempts = Path(cfg.out_dir) / EXECUTOR_JSON, []

    def record() -> None:
        attempts.extend(load_json(path).get("attempts", []) if path.is_file() else [])
        attempts.append({"executor": spec["executor"], "host": socket.gethostname(), "pid": os.getpid(),
                         "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                         "threads": torch.get_num_threads(), "start": time.time()})
        save_json({"attempts": attempts}, path)

    while (res := run_cell(spec["kind"], cfg, spec["redo_before"], spec["teacher"], token=spec["token"],
                           on_claim=record)) is None:
        time.sleep(poll_s)  # held by another live process (e.g. a local `cqd table` on the same folder)
    if attempts:
        attempts[-1]["end"] = time.time()
        save_json({"attempts": attempts}, path)
    return res


def study_teachers(spec: dict, threads: int) -> str:
    """A study's teachers, trained (or found) in a worker before its trial workers start."""
    import torch

    torch.set_num_threads(threads)
    shared_teachers(tune_config(spec), print, 5.0)
    return "teachers ready"


def study_worker(spec: dict, worker: int, threads: int) -> str:
    """Worker `worker` of a study: runs trials until the study holds its n_trials finished ones."""
    import torch

    torch.set_num_threads(threads)
    work(tune_config(spec), print, 5.0, worker=worker)
    return f"worker {worker} done"


