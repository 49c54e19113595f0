"""The slurm executor: tasks as submitit job arrays, one array per wave (a grid's teachers, then its cells; a study's
teachers, then its workers), with the parameters of `executor.slurm`, which submitit checks before anything is
submitted. The submitting process waits for each wave, runs again (`max_retries`) a job that ended without a result
(killed, preempted, out of time or memory) and reports each task as it ends. With `wait=False` (`cqd table
--no-wait`) the waves are chained by SLURM job dependencies and the call returns; the job ids are kept in
<folder>/jobs.json, and a later call waits for those still queued or running before it runs what is missing.
`cluster: local` runs the same jobs with submitit's local executor (processes of this machine): the same code path,
without a cluster.
"""
from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cqd.errors import ConfigError
from cqd.experiments.executor_config import ExecutorConfig
from cqd.experiments.locks import alive
from cqd.experiments.workers import CellFailed, Task, guarded, importable, need, outcome
from cqd.files import load_json, save_json

JOBS = "jobs.json"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
          "REQUEUE_FED", "STAGE_OUT", "SIGNALING"}  # SLURM's states of a job that is not over


def slurm_executor(ex: ExecutorConfig, folder: Path, name: str):
    """submitit's AutoExecutor with `executor.slurm`'s parameters (`time` as timeout_min, `cpus_per_cell` as
    cpus_per_task, `gpus_per_cell` as gpus_per_node, every other key as submitit's `slurm_<key>`); a parameter that
    submitit does not know, or refuses, is a ConfigError naming it."""
    submitit = need("slurm")
    opts = ex.slurm.model_dump(exclude_none=True)
    cluster, minutes = opts.pop("cluster"), opts.pop("time", None)
    opts.pop("folder", None)
    if minutes is None:
        raise ConfigError("executor.slurm.time is not set: give each job's time limit in minutes, e.g. "
                          "executor.slurm.time=120 (submitit's default, 5 minutes, would end most training runs)")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("executor slurm: no SLURM on this machine (sbatch is not on PATH): run cqd on a login node "
                          "of the cluster, or set executor.slurm.cluster=local to run the same jobs with submitit's "
                          "local executor here")
    gpus = ex.gpus_per_cell or 0
    if gpus != int(gpus):
        raise ConfigError(f"executor.gpus_per_cell={gpus:g}: a SLURM job gets whole GPUs (fractions are for Ray)")
    params: dict[str, Any] = {"timeout_min": minutes, "cpus_per_task": ex.cpus_per_cell or 1, "name": name,
                              **({"gpus_per_node": int(gpus)} if gpus else {})}
    params.update({f"slurm_{key}": value for key, value in opts.items()})
    try:
        aex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        aex.update_parameters(**params)
    except NameError as e:  # submitit's word for a parameter it does not know
        found = re.search(r"parameter 'slurm_([^']+)'\. Valid arguments: (.*)", str(e))
        key, valid = found.groups() if found else ("?", str(e).splitlines()[0])
        raise ConfigError(f"executor.slurm.{key} is not a SLURM parameter of submitit (its parameters: {valid}); "
                          "more sbatch options go in executor.slurm.additional_parameters, e.g. "
                          "{mail-type: END}") from None
    except (ValueError, TypeError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"executor.slurm: submitit refuses these parameters: {first}") from None
    return aex


def waves(tasks: list[Task]) -> list[list[Task]]:
    """The tasks by wave: a task's wave is one after the last of the waves of the tasks it comes after."""
    level: dict[str, int] = {}
    for t in tasks:
        level[t.name] = 1 + max((level[a] for a in t.after if a in level), default=-1)
    return [[t for t in tasks if level[t.name] == i] for i in range(max(level.values(), default=-1) + 1)]


def run_slurm(tasks: list[Task], ex: ExecutorConfig, folder: Path, name: str, log: Callable[[str], None],
              on_done: Callable[[str, Any], None], wait: bool = True) -> list[str]:
    """Submit `tasks` wave by wave and (`wait`) collect them; returns the ids of the jobs left running (no `wait`).
    submitit's local executor has no job dependencies: there, without `wait`, all but the last wave are waited for."""
    if not tasks:
        return []
    aex = slurm_executor(ex, folder, name)
    cluster, record, previous = ex.slurm.cluster, {}, []
    all_waves = waves(tasks)

    def note(task: str, job_id: str) -> None:
        record[task] = job_id
        save_json({"cluster": cluster, "jobs": record}, folder / JOBS)

    with importable():
        for i, wave in enumerate(all_waves):
            if previous:  # (without wait, on SLURM) a wave starts once the one before it has succeeded
                aex.update_parameters(slurm_dependency="afterok:" + ":".join(previous))
            jobs = aex.map_array(guarded, [t.fn for t in wave], [t.args for t in wave])
            for t, job in zip(wave, jobs):
                note(t.name, job.job_id)
            arrays = sorted({job.job_id.split("_")[0] for job in jobs})
            log(f"executor slurm ({cluster}): wave {i + 1} of {len(all_waves)}, {len(wave)} job(s): "
                f"{', '.join(arrays)}; logs in {folder}")
            if wait or (cluster == "local" and i < len(all_waves) - 1):
                collect(aex, wave, jobs, ex.max_retries, log, on_done, note, cluster)
                previous = []
            else:
                previous = arrays
    return [] if wait else list(record.values())


def collect(aex, wave: list[Task], jobs: list, retries: int, log: Callable[[str], None],
            on_done: Callable[[str, Any], None], note: Callable[[str, str], None], cluster: str) -> None:
    """Wait for a wave's jobs, `on_done(name, value)` as each ends; one that ended without a result is submitted
    again, up to `retries` times (an error raised by the task is not retried)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    left = {t.name: (t, job, 0) for t, job in zip(wave, jobs)}
    while left:
        for name, (t, job, n) in list(left.items()):
            if not job.done():
                continue
            del left[name]
            try:
                out = job.result()
            except FailedJobError:  # the task raised: a bug, whose traceback submitit's message holds
                raise
            except UncompletedJobError as e:
                if n >= retries:
                    raise CellFailed(f"{name}: its job {job.job_id} ended without a result on each of {n + 1} "
                                     f"attempt(s) (killed, out of time or memory: executor.slurm.time, mem_gb; the "
                                     f"last: {str(e).splitlines()[0][:200]}); its log: {job.paths.stderr}") from None
                again = aex.submit(guarded, t.fn, t.args)
                note(name, again.job_id)
                log(f"{name}: job {job.job_id} ended without a result; submitted again as {again.job_id} "
                    f"(retry {n + 1} of {retries})")
                left[name] = (t, again, n + 1)
                continue
            on_done(name, outcome(name, out))
        if left:
            time.sleep(0.5 if cluster == "local" else 10.0)


def active(cluster: str, folder: Path, job_id: str) -> bool:
    """Whether a recorded job is still queued or running (submitit's local jobs: their controller process lives)."""
    if cluster == "local":
        return job_id.isdigit() and alive(int(job_id))
    return need("slurm").SlurmJob(folder, job_id).state in ACTIVE


def wait_for_earlier(folder: Path, ex: ExecutorConfig, log: Callable[[str], None], wait: bool) -> list[str]:
    """The jobs an earlier call submitted (<folder>/jobs.json) that are still queued or running: waited for (`wait`;
    returns []), or returned (the caller submits nothing while they run)."""
    path = folder / JOBS
    if not path.is_file():
        return []
    rec = load_json(path)
    cluster, jobs = rec.get("cluster", ex.slurm.cluster), list(rec.get("jobs", {}).values())
    running = [j for j in jobs if active(cluster, folder, j)]
    if running and not wait:
        log(f"executor slurm: {len(running)} job(s) of an earlier call are still queued or running "
            f"({', '.join(running[:5])}{' ...' if len(running) > 5 else ''}): nothing submitted; run the same command "
            "again (without --no-wait to wait for them) to collect the grid")
    elif running:
        log(f"executor slurm: waiting for {len(running)} job(s) of an earlier call ({', '.join(running[:5])}"
            f"{' ...' if len(running) > 5 else ''})")
        while any(active(cluster, folder, j) for j in running):
            time.sleep(0.5 if cluster == "local" else 15.0)
        return []
    return running
