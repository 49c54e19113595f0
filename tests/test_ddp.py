"""Two-process CPU DDP (gloo) through the standard launcher, against the one-process run on the same global batch.

`python -m torch.distributed.run --nproc_per_node 2 -m cqd train ... train.strategy=ddp` with a per-rank
batch B is the one-process run with batch 2B: the EpochSampler gives rank r the items r, r+2, ... of the
same shuffled order, and DDP averages the two half-batch gradients. That holds exactly only for a
network without BatchNorm (with BatchNorm each rank normalises by its own half-batch statistics, and
SyncBatchNorm has no CPU support), so the equivalence test uses a BatchNorm-free ConvNeXt; the BatchNorm
test checks what DDP must still get right there: evaluation over the sharded test set with rank 0's stats.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cqd.engine.evaluate import evaluate_saved
from cqd.engine.schema import run_config
from cqd.engine.trainer import train
from cqd.files import load_checkpoint
from helpers import nested

pytestmark = pytest.mark.slow

N_TEST = 127  # odd: the two test shards differ in size, and no image may be counted twice
WEIGHT_ATOL = 1e-5  # after 6 SGD steps (measured 1.2e-7: float32 gradient averaging differs only in summation order)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(cfg: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            out += _overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}")
    return out


def _launch_ddp(cfg: dict, cwd: Path, timeout: int = 300, resume: bool = False, ok: bool = True, **env_over) -> str:
    """Runs `cqd train` in 2 CPU processes under torchrun; returns its stdout and stderr (asserts success if `ok`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env_over}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "cqd", "train", *(["--resume"] if resume else []),
           *_overrides(cfg), "train.accelerator=cpu", "train.devices=2", "train.strategy=ddp"]
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # its own process group: the ranks die with the launcher
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if ok:
        assert p.returncode == 0, f"DDP run failed ({p.returncode}):\n{out[-4000:]}\n{err[-6000:]}"
    return out + err


def _cfg(tmp: Path, name: str, batch: int, **over) -> dict:
    cfg = {"name": name, "seed": 0, "out_dir": str(tmp / name), "cache_dir": str(tmp / "cache"),
           "model": "timm:convnext_zepto_rms",
           "data": {"train_subset": 128, "test_subset": N_TEST, "image_size": 32, "degradation": "lowres:size=8"},
           "train": {"epochs": 2, "batch_size": batch, "lr": 0.02, "progress": False, "max_steps_per_epoch": 3,
                     "accelerator": "cpu", "precision": "32-true"},
           "method": {"name": "lq"}}
    return nested(cfg, **over)


def _is_count_of(acc: float, n: int) -> bool:
    return abs(acc * n - round(acc * n)) < 1e-4


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """f for CQD: resnet8 trained on A in this process (3 steps); any architecture can teach the ConvNeXt."""
    tmp = tmp_path_factory.mktemp("ddp-teacher")
    train(_cfg(tmp, "teacher", batch=32, model="resnet8", method__name="hq", train__epochs=1))
    return str(tmp / "teacher" / "model.pt")


def test_ddp_two_processes_equal_one_process_with_double_batch(tmp_path, teacher):
    """CQD (teacher table built on each rank, KD term averaged over ranks) on a BatchNorm-free student."""
    over = {"method__name": "cqd", "teacher__checkpoint": teacher}
    _launch_ddp(_cfg(tmp_path, "ddp", batch=16, **over), tmp_path)
    single = train(_cfg(tmp_path, "single", batch=32, **over))
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 1  # same items, teacher and view: one table

    a, b = (load_checkpoint(tmp_path / "ddp" / "model.pt")["model"],
            load_checkpoint(tmp_path / "single" / "model.pt")["model"])
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    moved = max(float((b[k].float() - v.float()).abs().max()) for k, v in _init_weights().items())
    print(f"max |w_ddp - w_single| = {diff:.3g} (weights moved up to {moved:.3g} from their init)")
    assert diff <= WEIGHT_ATOL
    assert moved > 100 * WEIGHT_ATOL  # training did change the weights, so the comparison means something

    for d, s in zip(ddp["history"], single["history"]):
        for k in ("loss_ce", "loss_kd"):
            assert d[k] == pytest.approx(s[k], rel=1e-4), k
        assert d["lr"] == pytest.approx(s["lr"], rel=1e-9)
    # every test image counted once over the two shards (64 + 63), and the same predictions up to one image
    for v in ("acc_hq", "acc_lq"):
        assert _is_count_of(ddp[v], N_TEST), ddp[v]
        assert abs(ddp[v] - single[v]) <= 1 / N_TEST + 1e-9, (v, ddp[v], single[v])


# Loaded by each process of a DDP run (a sitecustomize on its PYTHONPATH): rank 1 alone gets a SIGINT right
# after its optimizer step number CQD_TEST_SIGINT_AT, as when a signal reaches one rank, or the ranks at
# different points of their steps.
SIGINT_ON_RANK_1 = """
import os, signal
import torch.optim
_step, _count = torch.optim.SGD.step, [0]
def step(self, *args, **kwargs):
    out = _step(self, *args, **kwargs)
    _count[0] += 1
    if os.environ.get("RANK") == "1" and _count[0] == int(os.environ["CQD_TEST_SIGINT_AT"]):
        os.kill(os.getpid(), signal.SIGINT)
    return out
torch.optim.SGD.step = step
"""


def _sitecustomize(tmp_path: Path, code: str) -> str:
    """A PYTHONPATH whose sitecustomize runs `code` in every process started with it."""
    folder = tmp_path / "site"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))


def test_ddp_interrupt_on_one_rank_stops_every_rank_at_one_step_and_resume_equals_one_process(tmp_path):
    """A SIGINT that reaches rank 1 only, mid-epoch: both ranks stop after the same step (no rank left
    waiting in an all-reduce), rank 0 saves last.ckpt with its loss sums, and `--resume` under DDP ends
    with the weights of the uninterrupted one-process run on the double batch. The ranks agree on stopping at
    their checks (`train.check_every`, here every step)."""
    cfg = _cfg(tmp_path, "ddp", batch=16, train__check_every=1)
    out = _launch_ddp(cfg, tmp_path, timeout=120, ok=False, CQD_TEST_SIGINT_AT="4",
                      PYTHONPATH=_sitecustomize(tmp_path, SIGINT_ON_RANK_1))
    assert "interrupted: saved" in out, out[-6000:]
    ck = load_checkpoint(tmp_path / "ddp" / "last.ckpt")
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 1), (ck["epoch"], ck["step_in_epoch"])  # 3 + 1 steps done
    assert not (tmp_path / "ddp" / "model.pt").exists()
    _launch_ddp(cfg, tmp_path, resume=True)
    single = train(_cfg(tmp_path, "single", batch=32))
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    a, b = (load_checkpoint(tmp_path / "ddp" / "model.pt")["model"],
            load_checkpoint(tmp_path / "single" / "model.pt")["model"])
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= WEIGHT_ATOL
    for d, s in zip(ddp["history"], single["history"], strict=True):
        assert d["loss_ce"] == pytest.approx(s["loss_ce"], rel=1e-4)  # epoch 1's sums: rank 0's saved + resumed


def _init_weights() -> dict[str, torch.Tensor]:
    from cqd.models import create_model

    torch.manual_seed(0)
    return create_model("timm:convnext_zepto_rms", 10, 1).state_dict()


# Loaded by each process of the DDP run (a sitecustomize on its PYTHONPATH): records, per rank, the sum of
# every tensor handed to torch.distributed.broadcast before the broadcast overwrites it.
SPY = """
import os
import torch.distributed as dist
_broadcast = dist.broadcast
def broadcast(tensor, src=0, *args, **kwargs):
    with open(os.environ["CQD_TEST_SPY"] + "." + str(dist.get_rank()), "a") as f:
        f.write(repr(float(tensor.double().sum())) + "\\n")
    return _broadcast(tensor, src, *args, **kwargs)
dist.broadcast = broadcast
"""


def test_ddp_batchnorm_evaluates_like_the_saved_model(tmp_path):
    """resnet8 (BatchNorm) under DDP: the accuracy logged over the two test shards is the accuracy of
    model.pt (rank 0's weights and BatchNorm statistics) evaluated in one process; and the ranks' BatchNorm
    statistics did differ before the sync, so without it the ranks would evaluate different networks."""
    cfg = _cfg(tmp_path, "ddp-bn", batch=16, model="resnet8", train__lr=0.05)
    _launch_ddp(cfg, tmp_path, CQD_TEST_SPY=str(tmp_path / "broadcast"), PYTHONPATH=_sitecustomize(tmp_path, SPY))
    before = [(tmp_path / f"broadcast.{rank}").read_text().split() for rank in (0, 1)]
    assert len(before[0]) == len(before[1]) > 0  # the sync ran, on both ranks, for the same buffers
    assert before[0] != before[1]  # and had something to do: rank 1's statistics were its own
    res = json.loads((tmp_path / "ddp-bn" / "result.json").read_text())
    assert res["world_size"] == 2 and len(res["history"]) == 2
    ev = evaluate_saved(tmp_path / "ddp-bn" / "model.pt", run_config(cfg))
    assert ev["n_test"] == N_TEST
    assert (res["acc_hq"], res["acc_lq"]) == pytest.approx((ev["acc_hq"], ev["acc_lq"]), abs=1e-6)
