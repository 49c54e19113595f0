"""Wall time of one grid on two executors (not a test): prints a markdown table and writes JSON.

    python benchmarks/bench_executors.py [--out runs/bench_executors] [--workers 2] [--steps 4]

The same 8-cell grid (rows lq and cqd x 4 columns, one shared teacher; Fashion-MNIST at 16 px, `--steps` steps of
batch 16 per cell), 1 torch thread per cell, from an empty folder each time:
  1. local: `--workers` `cqd table` processes started at once on the folder (lock files), OMP_NUM_THREADS=1
  2. ray: one `cqd table --executor ray` with a Ray instance of `--workers` CPUs (1 CPU, 0 GPUs per cell)
and Ray's start-up on its own: `ray.init` with `--workers` CPUs, the first task on each of `--workers` workers
(each worker imports cqd and torch) and `ray.shutdown`. Both grids must give the same table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SRC = Path(__file__).resolve().parents[1] / "src"
COLUMNS = {"lowres": "lowres:size=4", "clutter": "clutter", "blur": "blur:sigma=1.5", "jpeg": "jpeg:quality=10"}

STARTUP = """
import json, sys, time
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
ray.init(num_cpus={n}, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False)
t2 = time.perf_counter()

@ray.remote(num_cpus=1)
def first():
    import cqd.experiments.workers  # what a cell's task imports first
    time.sleep(0.5)  # (so that each task takes its own worker)
    return 0

ray.get([first.remote() for _ in range({n})])
t3 = time.perf_counter()
ray.shutdown()
t4 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "init_s": t2 - t1, "workers_s": t3 - t2 - 0.5, "shutdown_s": t4 - t3}}))
"""


def grid_file(folder: Path, steps: int) -> Path:
    base = {"seed": 0, "model": "resnet8", "cache_dir": str(folder / "cache"),
            "data": {"train_subset": 16 * steps, "test_subset": 64, "image_size": 16},
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "progress": False, "max_steps_per_epoch": steps,
                      "precision": "32-true"}}
    cfg = {"name": "bench", "out_dir": str(folder / "grid"), "seeds": [0], "rows": ["lq", "cqd"],
           "columns": {k: {"degradation": v} for k, v in COLUMNS.items()}, "base": base,
           "executor": {"cpus_per_cell": 1}}
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run(commands: list[list[str]], folder: Path) -> float:
    """Seconds from starting `commands` at once to the last one's end (each must succeed)."""
    t = time.perf_counter()
    logs = [open(folder / f"proc{i}.log", "w+") for i in range(len(commands))]
    procs = [subprocess.Popen(c, env=env(), stdout=log, stderr=subprocess.STDOUT) for c, log in zip(commands, logs)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t
    for code, log in zip(codes, logs):
        log.seek(0)
        if code:
            sys.exit(f"a grid process failed ({code}):\n{log.read()[-3000:]}")
    return wall


def table(folder: Path) -> dict:
    return json.loads((folder / "grid" / "report" / "table.json").read_text())["table"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench_executors")
    ap.add_argument("--workers", type=int, default=2, help="local processes, and the Ray instance's CPUs")
    ap.add_argument("--steps", type=int, default=4, help="training steps of each cell")
    args = ap.parse_args()
    n, cqd = args.workers, [sys.executable, "-m", "cqd", "table"]
    with tempfile.TemporaryDirectory() as tmp:
        local, ray = Path(tmp) / "local", Path(tmp) / "ray"
        for f in (local, ray):
            f.mkdir()
        local_s = run([[*cqd, "--config", str(grid_file(local, args.steps))] for _ in range(n)], local)
        ray_s = run([[*cqd, "--config", str(grid_file(ray, args.steps)), "--executor", "ray",
                      f"executor.ray.num_cpus={n}", "executor.gpus_per_cell=0"]], ray)
        same = table(local) == table(ray)
        out = subprocess.run([sys.executable, "-c", STARTUP.format(n=n)], env=env(), capture_output=True, text=True,
                             check=True)
        startup = json.loads(out.stdout.strip().splitlines()[-1])
    res = {"cells": 2 * len(COLUMNS), "workers": n, "steps": args.steps, "local_s": local_s, "ray_s": ray_s,
           "ray_over_local": ray_s / local_s, "same_table": same, "ray_startup": startup, "cpus": os.cpu_count(),
           "load_1min": os.getloadavg()[0], "python": platform.python_version()}
    print(f"\n{res['cells']} cells (+1 shared teacher), 1 thread per cell, {n} workers, {os.cpu_count()} CPUs "
          f"(load {res['load_1min']:.1f} at the end)\n")
    print("| executor | wall s |\n|---|---|")
    print(f"| local: {n} `cqd table` processes on the folder | {local_s:.1f} |")
    print(f"| ray: 1 `cqd table --executor ray`, {n} CPUs | {ray_s:.1f} |")
    print(f"| ratio ray / local | {ray_s / local_s:.2f} |")
    print(f"\nRay's start-up: import {startup['import_s']:.1f} s, ray.init {startup['init_s']:.1f} s, first task on "
          f"{n} workers (each imports cqd) {startup['workers_s']:.1f} s, shutdown {startup['shutdown_s']:.1f} s. "
          f"Same table: {same}.")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_executors.json").write_text(json.dumps(res, indent=2))
    if not same:
        sys.exit("the two executors' tables differ")


if __name__ == "__main__":
    main()
