"""The ray executor: each task a Ray task with `cpus_per_cell` CPUs and `gpus_per_cell` GPUs (Ray gives each its
CUDA_VISIBLE_DEVICES), after the tasks it needs (task dependencies, no waiting loops); a task whose worker dies is
run again, up to `max_retries` times. On a Ray instance started here (`ray.init` with this machine's CPUs and GPUs,
ended after the call), or on a cluster (`executor.ray.address`)."""
from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from cqd.errors import ConfigError
from cqd.experiments.executor_config import ExecutorConfig
from cqd.experiments.workers import CellFailed, Task, guarded, importable, need, outcome


def ray_start(ray, ex: ExecutorConfig, log: Callable[[str], None]) -> bool:
    """Connect to `executor.ray.address`, or start a Ray instance here (True: this call did, and ends it)."""
    opts = ex.ray
    if opts.address is not None:
        reachable(opts.address)
    if ray.is_initialized():
        log("executor ray: on the Ray instance this process already runs")
        return False
    if opts.address is None:
        with importable():
            ray.init(num_cpus=opts.num_cpus, num_gpus=opts.num_gpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        return True
    if opts.num_cpus is not None or opts.num_gpus is not None:
        raise ConfigError("executor.ray.num_cpus and num_gpus size a Ray instance started here; with "
                          f"executor.ray.address={opts.address!r} the cluster's own resources are used: remove them")
    try:
        ray.init(address=opts.address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"executor.ray.address={opts.address!r}: no Ray cluster there ({str(e).strip()[:200]}); "
                          "start one (`ray start --head`), give its address (`ray status` on its head node prints "
                          "it), or leave executor.ray.address unset to start Ray on this machine") from None
    return True


def reachable(address: str, timeout_s: float = 5.0) -> None:
    """A Ray address `host:port` (or `ray://host:port`) answers; `auto` is left to Ray. (Ray itself waits minutes
    for an address where nothing answers.)"""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"executor.ray.address={address!r} is not a Ray address: give auto, host:port (e.g. "
                          "10.0.0.1:6379) or ray://host:10001")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"executor.ray.address={address!r}: nothing answers at {host}:{port} "
                          f"({e.strerror or type(e).__name__}); start the cluster there (`ray start --head`), give "
                          "the address `ray status` prints on its head node, or leave executor.ray.address unset to "
                          "start Ray on this machine") from None


def ray_resources(ray, ex: ExecutorConfig, started_here: bool) -> tuple[float, float]:
    """(CPUs, GPUs) of each task; on an instance started here, a task that would never fit is a ConfigError."""
    have = ray.cluster_resources()
    cpus = ex.cpus_per_cell or 1
    gpus = ex.gpus_per_cell if ex.gpus_per_cell is not None else (1 if have.get("GPU", 0) >= 1 else 0)
    if started_here:
        for key, want, kind in (("cpus_per_cell", cpus, "CPU"), ("gpus_per_cell", gpus, "GPU")):
            if want > have.get(kind, 0):
                raise ConfigError(f"executor.{key}={want:g}, but the Ray instance has {have.get(kind, 0):g} {kind}(s) "
                                  f"(executor.ray.num_{kind.lower()}s sizes it): no cell could ever start")
    return cpus, gpus


def run_ray(tasks: list[Task] | Callable[[int], list[Task]], ex: ExecutorConfig, log: Callable[[str], None],
            on_done: Callable[[str, Any], None]) -> None:
    """Each task as a Ray task (its `after` tasks as dependencies), retried `max_retries` times when its worker dies;
    `on_done(name, value)` as each finishes. The first failure cancels the rest and is raised. `tasks` may be a
    function of how many tasks the instance runs at once (a study's workers)."""
    ray = need("ray")
    started = ray_start(ray, ex, log)
    try:
        cpus, gpus = ray_resources(ray, ex, started and ex.ray.address is None)
        have = ray.cluster_resources()
        if callable(tasks):
            tasks = tasks(int(max(1, min(have.get("CPU", 1) // cpus, have.get("GPU", 0) // gpus if gpus else 1e9))))
        log(f"executor ray: {len(tasks)} task(s), {cpus:g} CPU(s) and {gpus:g} GPU(s) each, up to {ex.max_retries} "
            f"retries; Ray has {have.get('CPU', 0):g} CPU(s) and {have.get('GPU', 0):g} GPU(s)")
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=ex.max_retries, retry_exceptions=False)(guarded)
        refs: dict[str, Any] = {}
        for t in tasks:
            refs[t.name] = remote.options(name=t.name).remote(t.fn, t.args, *(refs[a] for a in t.after))
        names = {ref: name for name, ref in refs.items()}
        pending = list(names)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    on_done(names[ref], outcome(names[ref], ray_get(ray, ref, names[ref], ex)))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


def ray_get(ray, ref, name: str, ex: ExecutorConfig) -> tuple:
    """A finished task's outcome; a worker that died on every attempt is a CellFailed, a bug in the task its own
    exception."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # the task raised (not a CQDError: `guarded` returns those)
        raise (e.cause if isinstance(e.cause, Exception) else e) from None
    except ray.exceptions.RayError as e:
        raise CellFailed(f"{name}: its Ray worker died on each of {ex.max_retries + 1} attempt(s) (the last: "
                         f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}); raise "
                         "executor.max_retries, or read the worker logs (/tmp/ray/session_latest/logs on its "
                         "node)") from None


