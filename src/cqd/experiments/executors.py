"""Executors: where a grid's cells and a study's trials run (`executor:` of the config, `--executor`).

- local: `run_grid` in this process; other processes started on the same folder share the grid (lock files).
- ray: one Ray task per cell, with `cpus_per_cell` CPUs and `gpus_per_cell` GPUs (Ray sets each task's
  CUDA_VISIBLE_DEVICES), each teacher's task before the cells that need it (task dependencies); a task whose
  worker dies is run again (`max_retries`).
- slurm: submitit job arrays, one per wave (teachers, then cells; `cqd.experiments.slurm`).

Every executor runs the same cell function, `run_cell` (through `run_one` in a worker), after the same checks
(`prepare`: a finished cell is never run again, one made under other settings stops the grid), with a fixed number
of torch threads per cell, so a cell's result does not depend on where it ran. A study runs `workers` workers on the
one study (`study`), after one task that trains its teachers.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from cqd.config import validate
from cqd.errors import ConfigError
from cqd.experiments.executor_config import ExecutorConfig
from cqd.experiments.grid import Cell, prepare, run_grid
from cqd.experiments.schema import GridConfig, TuneConfig
from cqd.experiments.tune import open_study, storage_url, tune, write_report
from cqd.experiments.workers import Task, need, run_one, study_teachers, study_worker


def with_executor(grid_or_study, executor: str | dict | ExecutorConfig | None):
    """A grid or study config with `executor` (a name, a dict as `executor:` holds, or an ExecutorConfig)."""
    if executor is None:
        return grid_or_study
    if not isinstance(executor, ExecutorConfig):
        executor = validate(ExecutorConfig, executor, "executor")
    return grid_or_study.model_copy(update={"executor": executor})


def execute(grid: GridConfig, force: bool = False, on_cell: Callable[[str, dict], None] | None = None,
            log: Callable[[str], None] = print, wait: bool = True) -> dict:
    """Run the grid's cells on its executor; returns {"reused": cells finished before this call, "submitted": ids
    of SLURM jobs left running (`wait=False`), else []}."""
    ex = grid.executor
    if not wait and ex.name != "slurm":
        raise ConfigError(f"--no-wait (wait=False) submits SLURM jobs that outlive this process; with executor "
                          f"{ex.name!r} the cells run in this call: drop --no-wait, or use executor.name=slurm")
    if ex.name == "local":
        return {**run_local(grid, force, on_cell, log), "submitted": []}
    need(ex.name)
    folder = Path(ex.slurm.folder or Path(grid.out_dir) / "slurm")
    if ex.name == "slurm":
        from cqd.experiments.slurm import wait_for_earlier

        running = wait_for_earlier(folder, ex, log, wait)
        if running:
            return {"reused": [], "submitted": running}
    cells, reused, since = prepare(grid, force, log)
    tasks = cell_tasks([c for c in cells if c.cfg.name not in reused], ex, since)
    if not tasks:  # (no instance started, nothing submitted)
        return {"reused": reused, "submitted": []}

    def done(name: str, res: dict) -> None:
        if on_cell is not None:
            on_cell(name, res)

    if ex.name == "ray":
        from cqd.experiments.ray_tasks import run_ray

        run_ray(tasks, ex, log, done)
        return {"reused": reused, "submitted": []}
    from cqd.experiments.slurm import run_slurm

    return {"reused": reused, "submitted": run_slurm(tasks, ex, folder, f"cqd-{grid.name}", log, done, wait)}


def run_local(grid: GridConfig, force: bool, on_cell, log: Callable[[str], None]) -> dict:
    """The local executor: `run_grid` with `cpus_per_cell` torch threads (default: the process's, said)."""
    import torch

    before, n = torch.get_num_threads(), grid.executor.cpus_per_cell
    if n:
        torch.set_num_threads(n)
    log(f"executor local: {torch.get_num_threads()} torch thread(s) per cell "
        + ("(executor.cpus_per_cell)" if n else "(this process's; executor.cpus_per_cell sets it)"))
    try:
        return run_grid(grid, force=force, on_cell=on_cell, log=log)
    finally:
        torch.set_num_threads(before)


def cell_tasks(cells: list[Cell], ex: ExecutorConfig, since: float | None) -> list[Task]:
    """A task per cell to run, each after the tasks of the shared teachers it needs (those still to train)."""
    run, teachers, tasks = uuid.uuid4().hex[:12], {}, []
    for c in cells:
        name = c.cfg.name
        # a retried task takes over its dead attempt's lock: Ray's attempts are of this call; SLURM's jobs of a
        # grid (a later `cqd table` resubmits what an earlier one's jobs left) run one at a time per cell
        token = f"slurm:{c.cfg.out_dir}" if ex.name == "slurm" else f"ray:{run}:{name}"
        spec = {"kind": c.kind, "config": c.cfg.model_dump(), "teacher": c.column is None, "redo_before": since,
                "threads": ex.cpus_per_cell or 1, "token": token, "executor": ex.name}
        after = tuple(teachers[str(Path(t.checkpoint).parent)] for t in c.cfg.teacher_list
                      if t.checkpoint is not None and str(Path(t.checkpoint).parent) in teachers)
        if c.column is None:
            teachers[c.cfg.out_dir] = name
        tasks.append(Task(name, run_one, (spec,), after))
    return tasks


def study(tc: TuneConfig, log: Callable[[str], None] = print, poll_s: float = 5.0) -> dict:
    """Run (or continue) the study of `tc` on its executor (local: `tune`, in this process; ray and slurm: one task
    that trains its teachers, then `workers` workers on the one study, whose storage they must all reach), then
    write its report here."""
    ex = tc.executor
    if ex.name == "local":
        return tune(tc, log, poll_s)
    need(ex.name)
    open_study(tc, log)  # the study's settings are checked (and recorded) before anything is submitted
    spec, threads = {**tc.model_dump(), "executor": {"name": "local"}}, ex.cpus_per_cell or 1
    if ex.name == "slurm" and storage_url(tc).startswith("sqlite"):
        log("note: the study's storage is SQLite, which a network file system may not lock: give storage: "
            "journal:PATH on the shared folder, or a database server's URL")
    done = lambda name, value: log(f"{name}: {value}")  # noqa: E731
    if ex.name == "ray":
        from cqd.experiments.ray_tasks import run_ray

        run_ray(lambda slots: study_tasks(spec, ex.workers or min(tc.n_trials, slots), threads), ex, log, done)
    else:
        from cqd.experiments.slurm import run_slurm

        n = ex.workers or tc.n_trials
        run_slurm(study_tasks(spec, n, threads), ex, Path(ex.slurm.folder or Path(tc.out_dir) / "slurm"),
                  f"cqd-tune-{tc.name}", log, done, True)
    study_now, _ = open_study(tc, lambda _: None)  # (its notes were said at the start)
    return write_report(study_now, tc, log)


def study_tasks(spec: dict, n: int, threads: int) -> list[Task]:
    teachers = Task("teachers", study_teachers, (spec, threads))
    return [teachers, *(Task(f"worker{i}", study_worker, (spec, i, threads), ("teachers",)) for i in range(n))]


def describe_study(res: dict) -> str:
    """A study's report (`tune`'s return) as the lines `cqd tune` prints."""
    lines = [f"study {res['study']!r}: " + ", ".join(f"{n} {state}" for state, n in res["trials"].items())]
    if res["best"]:
        best = res["best"]
        values = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        lines.append(f"best val top-1 on z: {100 * best['value']:.1f}% (trial {best['trial']}): {values}")
    lines.append(f"report: {res['out_dir']}/best.yaml, trials.csv, optimization_history.png, param_importances.png")
    return "\n".join(lines)
