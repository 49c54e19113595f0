"""SIGKILL a real `python -m cqd train` at random moments, resume it each time, and get exactly the
model and results of an uninterrupted run.

SIGKILL cannot be caught, so nothing is saved at the kill: the run relies on the epoch checkpoints
being written atomically (temp file + rename). A kill can land inside a checkpoint write; last.ckpt
must then still be the previous complete file, and the dead writer's temp file is cleaned up later.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cqd import api
from cqd.engine.checkpoint import load_checkpoint

KILLS = 3


def tiny(out: Path, cache: Path) -> dict:
    return {"name": "killed", "seed": 0, "out_dir": str(out), "cache_dir": str(cache), "model": "resnet8",
            "data": {"train_subset": 256, "test_subset": 128, "image_size": 32, "degradation": "lowres:size=8"},
            "train": {"epochs": 8, "batch_size": 32, "lr": 0.05, "progress": False, "max_steps_per_epoch": 3},
            "method": {"name": "lq"}}


def launch(config: Path, resume: bool, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cqd", "train", "--config", str(config)] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def epochs_logged(log: Path) -> int:
    return log.read_text(errors="replace").count("killed epoch ") if log.exists() else 0


def wait_for_epoch(log: Path, before: int, proc: subprocess.Popen, timeout: float = 180) -> bool:
    """True once this process has logged an epoch (so it saved a checkpoint), False if it ended first."""
    t0 = time.monotonic()
    while epochs_logged(log) <= before:
        if proc.poll() is not None:
            return False
        assert time.monotonic() - t0 < timeout, "the run made no progress"
        time.sleep(0.02)
    return True


def weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = api.train(tiny(tmp_path / "ref", tmp_path / "cache"))

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny(out, tmp_path / "cache")))
    log = tmp_path / "log.txt"
    rng = random.Random(20240611)
    epochs_at_kill = []
    for attempt in range(KILLS):
        before = epochs_logged(log)
        proc = launch(config, resume=attempt > 0, log=log)
        # after the process's first epoch, a random moment within the next one or two epochs:
        # mid-step, mid-evaluation or inside a checkpoint write
        if wait_for_epoch(log, before, proc):
            time.sleep(rng.uniform(0.0, 0.6))
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=120)
        assert proc.returncode in (0, -signal.SIGKILL), log.read_text()[-3000:]
        ck = load_checkpoint(out / "last.ckpt")  # whatever the moment of the kill: a complete checkpoint
        assert ck["step_in_epoch"] == 0  # SIGKILL saves nothing: only epoch-end checkpoints exist
        epochs_at_kill.append(ck["epoch"])
        if proc.returncode == 0:
            break
    assert epochs_at_kill == sorted(epochs_at_kill) and epochs_at_kill[0] >= 1

    proc = launch(config, resume=True, log=log)
    assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]

    got, want = weights(out / "model.pt"), weights(tmp_path / "ref" / "model.pt")
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"resumed weights differ in {differ[:5]} (kills at {epochs_at_kill})"

    result = json.loads((out / "result.json").read_text())
    assert (result["acc_hq"], result["acc_lq"]) == (reference["acc_hq"], reference["acc_lq"])
    assert len(result["history"]) == len(reference["history"]) == 8
    for a, b in zip(result["history"], reference["history"]):
        assert a["epoch"] == b["epoch"] and a["loss_ce"] == b["loss_ce"] and a["lr"] == b["lr"]
    assert not list(out.glob(".*.tmp")), "a killed writer's temp file was left behind"


WRITER = """
import sys, torch
from cqd.engine.checkpoint import save_checkpoint
path, i = sys.argv[1], int(sys.argv[2])
while True:
    save_checkpoint({"i": i, "w": torch.full((1_000_000,), float(i))}, path)
    print(i, flush=True)
    i += 1
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_keeps_a_complete_file(tmp_path):
    """A process that does nothing but rewrite a 4 MB checkpoint is killed at random moments (mostly
    inside a write): the file is always a complete one, and the dead writers' temp files go away."""
    path = tmp_path / "last.ckpt"
    rng = random.Random(7)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start, torn = 0, 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(start)], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert int(proc.stdout.readline()) == start  # its first write is complete (and old temps are gone)
        time.sleep(rng.uniform(0.05, 0.5))
        proc.kill()
        proc.wait()
        torn += bool(list(tmp_path.glob(".*.tmp")))
        ck = load_checkpoint(path)
        assert torch.equal(ck["w"], torch.full((1_000_000,), float(ck["i"])))
        start = ck["i"] + 1
    assert start > 3
    print(f"{torn} of 3 kills landed inside a checkpoint write")
    proc = subprocess.run([sys.executable, "-c", WRITER.replace("while True", "for _ in range(1)"), str(path),
                           str(start)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(path)["i"] == start
    assert not list(tmp_path.glob(".*.tmp")), f"temp files of killed writers left ({torn} kills landed mid-write)"
