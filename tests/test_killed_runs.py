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


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """True once `path` exists (the run reached its training loop), False if the process ended first."""
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            return False
        assert time.monotonic() - t0 < timeout, "the run did not start"
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
        (out / "config.json").unlink(missing_ok=True)  # rewritten by each run just before its loop
        proc = launch(config, resume=attempt > 0, log=log)
        started = wait_for(out / "config.json", proc)
        if started:
            time.sleep(rng.uniform(0.05, 1.0))
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=120)
        assert proc.returncode in (0, -signal.SIGKILL), log.read_text()[-3000:]
        if (out / "last.ckpt").exists():  # whatever the moment of the kill, a complete checkpoint
            ck = load_checkpoint(out / "last.ckpt")
            epochs_at_kill.append((ck["epoch"], ck["step_in_epoch"]))
            assert ck["step_in_epoch"] == 0  # SIGKILL saves nothing: only epoch-end checkpoints exist
        if proc.returncode == 0:
            break
    assert epochs_at_kill, "no kill landed after a checkpoint; lower the delays"

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
