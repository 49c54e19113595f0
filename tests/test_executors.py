"""Executors of grids and studies: Ray (a local instance, logical GPUs, a worker killed mid-cell), SLURM through
submitit's local executor, Optuna's journal storage shared by workers, and the clear errors of each.

Every grid here is the tiny 2-column x 2-row grid (rows lq and cqd: one shared teacher), 1 torch thread per cell, so
each executor's table must equal the local executor's exactly.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from cqd.api import table, tune
from cqd.cli import main
from helpers import tiny_cfg

if os.environ.get("CQD_CI"):  # .ci/run: the test extra installs the ray and slurm extras, so these never skip there
    import ray
    import submitit  # noqa: F401
else:
    ray = pytest.importorskip("ray")
    pytest.importorskip("submitit")

CELLS = 5  # 1 shared teacher + 2 rows x 2 columns


def grid(root: Path, **executor) -> dict:
    base = tiny_cfg(root, "base")
    base.pop("out_dir")
    return {"name": "tiny", "out_dir": str(root / "grid"), "seeds": [0], "rows": ["lq", "cqd"],
            "columns": {"lowres": {"degradation": "lowres:size=4"}, "clutter": {"degradation": "clutter"}},
            "base": base, "executor": {"cpus_per_cell": 1, **executor}}


def results(root: Path) -> dict:
    """{cell folder: (top-1 on x, top-1 on z)} of every result.json of the grid in root."""
    out = {}
    for p in sorted((root / "grid").rglob("result.json")):
        res = json.loads(p.read_text())
        out[str(p.parent.relative_to(root / "grid"))] = (res["acc_hq"], res["acc_lq"])
    return out


def attempts(root: Path) -> dict:
    """{cell folder: its attempts, as the executor recorded them in executor.json}."""
    return {str(p.parent.relative_to(root / "grid")): json.loads(p.read_text())["attempts"]
            for p in (root / "grid").rglob("executor.json")}


def report(root: Path) -> dict:
    return json.loads((root / "grid" / "report" / "table.json").read_text())["table"]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The local executor's table and cells, at 1 thread per cell."""
    root = tmp_path_factory.mktemp("local")
    table(grid(root, name="local"))
    assert len(results(root)) == CELLS
    return report(root), results(root)


@pytest.fixture(scope="module")
def ray_gpus():
    """One Ray instance for the Ray tests, started as the executor starts its own (`ray_start`): 2 CPUs and 2 logical
    GPUs (this machine has none)."""
    from cqd.experiments.executor_config import ExecutorConfig
    from cqd.experiments.ray_tasks import ray_start

    assert ray_start(ray, ExecutorConfig(ray={"num_cpus": 2, "num_gpus": 2}), print) and ray.is_initialized()
    yield ray
    ray.shutdown()


def test_a_grid_on_ray_with_two_cpu_workers_equals_the_local_one_and_trains_the_teacher_once(tmp_path, local,
                                                                                              ray_gpus):
    out = table(grid(tmp_path, name="ray", gpus_per_cell=0))
    assert (report(tmp_path), results(tmp_path)) == local and out["submitted"] == []
    tries = attempts(tmp_path)
    assert sorted(tries) == sorted(local[1]) and all(len(t) == 1 for t in tries.values()), tries
    assert [t[0]["threads"] for t in tries.values()] == [1] * CELLS
    assert sum(name.startswith("teachers/") for name in tries) == 1  # one teacher, trained once
    # a second call finds every cell finished: no task is started, nothing runs again
    mtimes, ran = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")}, []
    assert len(table(grid(tmp_path, name="ray"), on_cell=lambda name, res: ran.append(name))["reused"]) == CELLS
    assert ran == [] and attempts(tmp_path) == tries
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")} == mtimes


def test_one_gpu_per_cell_runs_two_cells_at_once_each_on_its_own_gpu(tmp_path, local, ray_gpus):
    free, running = [], [True]

    def watch():  # the GPUs Ray has left while the grid runs: 0 while two cells hold one each
        while running[0]:
            free.append(ray.available_resources().get("GPU", 0))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        table({**grid(tmp_path, name="ray"), "rows": ["lq"]})  # gpus_per_cell: 1 by default where Ray has GPUs
    finally:
        running[0] = False
        watcher.join()
    assert results(tmp_path) == {k: v for k, v in local[1].items() if k.endswith("/lq/s0")}
    gpus = sorted(t[0]["CUDA_VISIBLE_DEVICES"] for t in attempts(tmp_path).values())
    assert gpus == ["0", "1"] and min(free) == 0, (gpus, sorted(set(free)))  # each cell its own GPU, both at once


def study(root: Path, **over) -> dict:
    base = tiny_cfg(root, "base", data__val_fraction=0.25, method__name="lq")
    root.mkdir(parents=True, exist_ok=True)
    return {"name": "study", "out_dir": str(root / "tune"), "base": base, "search": {"train.lr": {"low": 0.01,
            "high": 0.1, "log": True}}, "storage": f"journal:{root / 'study.log'}", **over}


def trials(tc: dict) -> list:
    import optuna

    from cqd.experiments.schema import tune_config
    from cqd.experiments.tune import storage

    return optuna.load_study(study_name="study", storage=storage(tune_config(tc))).get_trials()


def test_two_ray_workers_share_a_study_on_the_journal_storage(tmp_path, ray_gpus):
    from optuna.trial import TrialState

    def warm():  # two Ray workers that have imported cqd, so that both start trials at once
        import cqd.experiments.workers  # noqa: F401

        time.sleep(1)
        return os.getpid()

    assert len(set(ray.get([ray.remote(num_cpus=1)(warm).remote() for _ in range(2)]))) == 2
    tc = study(tmp_path, n_trials=8, executor={"name": "ray", "workers": 2, "cpus_per_cell": 1, "gpus_per_cell": 0})
    res = tune(tc)
    done = [t for t in trials(tc) if t.state == TrialState.COMPLETE]
    assert set(res["trials"]) == {"complete"} and res["trials"]["complete"] >= 8  # (both may finish the last one)
    assert len({t.user_attrs["worker"] for t in done}) == 2, [(t.number, t.user_attrs["worker"]) for t in done]
    assert (tmp_path / "tune" / "best.yaml").is_file()


def test_a_ray_worker_killed_mid_cell_is_retried_and_no_finished_cell_runs_again(tmp_path, local, ray_gpus):
    victim = tmp_path / "grid" / "cells" / "lowres" / "cqd" / "s0"
    killed, before = [], {}

    def kill():  # SIGKILL the worker that runs the cell, once it has claimed it and recorded its attempt
        while not killed and not finished.is_set():  # however long a loaded machine takes to get there
            try:
                pid = json.loads((victim / ".lock").read_text())["pid"]
                recorded = [a["pid"] for a in json.loads((victim / "executor.json").read_text())["attempts"]]
            except (OSError, ValueError, KeyError):
                time.sleep(0.01)
                continue
            if recorded != [pid]:  # claimed, but its attempt is not written yet
                time.sleep(0.01)
                continue
            before.update({p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")})
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    finished = threading.Event()
    watcher = threading.Thread(target=kill, daemon=True)
    watcher.start()
    try:
        table(grid(tmp_path, name="ray", gpus_per_cell=0))
    finally:
        finished.set()
    watcher.join(timeout=5)
    assert killed and (report(tmp_path), results(tmp_path)) == local
    tries = attempts(tmp_path)
    assert [t["pid"] for t in tries["cells/lowres/cqd/s0"]][0] == killed[0] and len(tries["cells/lowres/cqd/s0"]) == 2
    assert all(len(t) == 1 for cell, t in tries.items() if cell != "cells/lowres/cqd/s0"), tries
    assert before and all(p.stat().st_mtime_ns == m for p, m in before.items())  # written once


def test_a_grid_through_slurm_on_submitits_local_executor_equals_the_local_one_and_no_wait_is_collected_later(
        tmp_path, local):
    cfg = grid(tmp_path, name="slurm", slurm={"cluster": "local", "time": 10})
    first = table(cfg, wait=False)  # submits; (the local cluster waits for the teachers' wave: no job dependencies)
    assert first["submitted"] and first["report_dir"] is None and len(results(tmp_path)) < CELLS  # still running
    out = table(cfg)  # waits for the jobs still running, then writes the report
    assert out["submitted"] == [] and (report(tmp_path), results(tmp_path)) == local
    assert all(len(t) == 1 for t in attempts(tmp_path).values()) and len(attempts(tmp_path)) == CELLS
    assert set(json.loads((tmp_path / "grid" / "slurm" / "jobs.json").read_text())["jobs"]) == {
        "teacher/full-none/s0", *(f"{c}/{r}/s0" for c in ("lowres", "clutter") for r in ("lq", "cqd"))}


def test_a_dead_workers_running_trial_on_the_journal_storage_is_marked_failed(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from cqd.experiments.schema import tune_config
    from cqd.experiments.tune import storage

    tc = study(tmp_path, n_trials=1)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a worker process that is gone, and one that lives (pid 1)
    s = optuna.create_study(study_name="study", storage=storage(tune_config(tc)), direction="maximize")
    for pid in (gone.pid, 1):
        s.ask().set_user_attr("worker", f"{socket.gethostname()}:{pid}")
    with pytest.warns(UserWarning, match=f"left running by .*:{gone.pid}, a process that is gone"):
        assert tune(tc)["trials"] == {"running": 1, "complete": 1, "fail": 1}
    assert [t.state for t in trials(tc)] == [TrialState.FAIL, TrialState.RUNNING, TrialState.COMPLETE]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, missing, message", [
    (["--executor", "ray"], "ray", r"needs the Python package 'ray'.*pip install 'cqd-distill\[ray\]'"),
    (["--executor", "slurm"], "submitit", r"needs the Python package 'submitit'.*pip install 'cqd-distill\[slurm\]'"),
    (["--executor", "ray", f"executor.ray.address=127.0.0.1:{free_port()}"], None,
     r"executor.ray.address='127.0.0.1:\d+': nothing answers at 127.0.0.1:\d+"),
    (["--executor", "slurm", "executor.slurm.cluster=local", "executor.slurm.time=5", "executor.slurm.partitio=gpu"],
     None, r"executor.slurm.partitio is not a SLURM parameter of submitit \(its parameters: .*partition"),
    (["--executor", "slurm", "executor.slurm.cluster=local"], None, r"executor.slurm.time is not set"),
    (["--executor", "slurm", "executor.slurm.time=5"], None,
     r"no SLURM on this machine \(sbatch is not on PATH\).*executor.slurm.cluster="),
    (["--executor", "ray", "--no-wait"], None, r"--no-wait .* with executor 'ray' the cells run in this call"),
])
def test_executor_mistakes_are_clear_errors_before_anything_runs(tmp_path, monkeypatch, capsys, args, missing,
                                                                  message):
    import re

    if missing:
        monkeypatch.setitem(sys.modules, missing, None)  # as if the extra were not installed
    if "sbatch" in message and __import__("shutil").which("sbatch"):
        pytest.skip("this machine has SLURM")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid(tmp_path)))
    assert main(["table", "--config", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert not list(tmp_path.rglob("result.json"))
