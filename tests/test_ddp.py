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
import time
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


# --- more kinds of run under DDP (issue 34): several runs in one launch, each against one process ----------------

# Run by each of the 2 processes under torchrun: trains every config given (JSON files) in turn in the one process
# group (a second Fabric finds it initialized), and saves each rank's final deployable weights beside model.pt, so a
# test can see that the ranks agree. A run that fails writes its error, on every rank alike, and the next one runs.
RUNS = """
import json, os, sys, traceback
import torch
from cqd.engine.precision import flush_denormals
from cqd.engine.trainer import Run
for path in sys.argv[1:]:
    cfg = json.load(open(path))
    rank = os.environ["RANK"]
    try:
        with flush_denormals():
            run = Run.start(cfg)
            run.fit()
        state = {k: v.detach().clone() for k, v in run.method.deployable().named_parameters()}
        torch.save(state, os.path.join(cfg["out_dir"], f"params.rank{rank}.pt"))
    except Exception:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        open(os.path.join(cfg["out_dir"], f"error.rank{rank}.txt"), "w").write(traceback.format_exc())
"""


def _ddp(cfg: dict) -> dict:
    return nested(json.loads(json.dumps(cfg)), train__accelerator="cpu", train__devices=2, train__strategy="ddp")


def _sr_cfg(tmp: Path, name: str, batch: int, **over) -> dict:
    """A BatchNorm-free EDSR x2 student on 8 px LR patches (32 a epoch: 2 steps of 16 in all)."""
    cfg = {"name": name, "seed": 0, "out_dir": str(tmp / name), "cache_dir": str(tmp / "cache"), "task": "sr",
           "model": "edsr:blocks=2,feats=4,skip=bicubic",
           "sr": {"scale": 2, "patch": 8, "patches_per_epoch": 32, "train": ["text", "clock"], "test": ["page"]},
           "method": {"name": "sr_l1"},
           "train": {"epochs": 2, "batch_size": batch, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
                     "progress": False, "precision": "32-true", "accelerator": "cpu"}}
    return nested(cfg, **over)


@pytest.fixture(scope="module")
def more_runs(tmp_path_factory):
    """The DDP runs (per-rank batch B) and their one-process twins (batch 2B), trained: {name: (ddp config, single
    config)}, and under "qat_eval" the int8 evaluation of the DDP QAT run's model.pt (or the error it raised).
    One launch trains the five DDP runs, QAT first; while it trains the others, this process evaluates the QAT
    model (its int8 conversion alone takes ~20 s) and trains the one-process twins."""
    tmp = tmp_path_factory.mktemp("ddp-more")
    train(_sr_cfg(tmp, "sr-teacher", batch=16, model="edsr:blocks=2,feats=6,skip=bicubic", method__name="sr_teacher",
                  train__epochs=1))
    sgn = {"method__name": "sgn", "teacher__checkpoint": str(tmp / "sr-teacher" / "model.pt"),
           "train__phases": {"main": {"lr": 1e-3}}}
    kinds = {
        "qat": (_cfg, {"model": "resnet8", "compress": {"qat": True, "recalibrate_bn": 0}, "train__epochs": 1}),
        "prune": (_cfg, {"compress": {"prune": {"ratio": 0.25, "schedule": "iterative", "steps": 2}}}),
        "mix": (_cfg, {"data__degradation": "none",
                       "data__mix": {"degradations": ["lowres:size=8", "blur:sigma=1.5"], "alpha": 0.5}}),
        "sr": (_sr_cfg, {}),
        "sgn": (_sr_cfg, sgn),
    }
    runs = {k: (_ddp(make(tmp, f"ddp-{k}", batch=8 if make is _sr_cfg else 16, **over)),
                make(tmp, f"single-{k}", batch=16 if make is _sr_cfg else 32, **over))
            for k, (make, over) in kinds.items()}
    files = []
    for k, (cfg, _) in runs.items():
        files.append(tmp / f"{k}.json")
        files[-1].write_text(json.dumps(cfg))
    (tmp / "runs.py").write_text(RUNS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(tmp / "runs.py"), *map(str, files)]
    log = (tmp / "ddp.log").open("w")
    p = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        qat = Path(runs["qat"][0]["out_dir"])
        deadline = time.monotonic() + 240
        while (p.poll() is None and time.monotonic() < deadline
               and not all((qat / f"params.rank{r}.pt").is_file() for r in (0, 1))):
            time.sleep(0.5)
        try:  # the int8 form of the saved QAT model, in one process, as `cqd eval` makes it
            single = nested(json.loads(json.dumps(runs["qat"][0])), train__devices=1, train__strategy="auto")
            runs["qat_eval"] = evaluate_saved(qat / "model.pt", run_config(single))
        except Exception as e:  # noqa: BLE001 - reported by the QAT test
            runs["qat_eval"] = e
        for k in kinds:
            if k != "qat":
                train(runs[k][1])
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    assert p.returncode == 0, f"DDP runs failed ({p.returncode}):\n{(tmp / 'ddp.log').read_text()[-6000:]}"
    return runs


def _ran(cfg: dict) -> Path:
    out = Path(cfg["out_dir"])
    errors = sorted(out.glob("error.rank*.txt"))
    assert not errors, errors[0].read_text()[-4000:]
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("kind", ["prune", "mix", "sr", "sgn"])
def test_ddp_runs_of_other_kinds_equal_one_process_with_double_batch(more_runs, kind):
    """Iterative pruning (the student rebuilt and handed to DDP again mid-run), blends of a data.mix (c drawn per
    item), task sr (LR patches) and sgn (two phases, a discriminator, a teacher): 2 processes x B = 1 x 2B."""
    ddp_cfg, single_cfg = more_runs[kind]
    out = _ran(ddp_cfg)
    a = load_checkpoint(out / "model.pt")["model"]
    b = load_checkpoint(Path(single_cfg["out_dir"]) / "model.pt")["model"]
    diff = _max_diff(a, b)
    print(f"{kind}: max |w_ddp - w_single| = {diff:.3g}")
    assert diff <= WEIGHT_ATOL
    ranks = [torch.load(out / f"params.rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert _max_diff(*ranks) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["world_size"] == 2


def test_ddp_qat_ranks_agree_and_the_int8_model_evaluates(more_runs):
    """QAT (torchao's PT2E graph, observers per rank): the weaker check. Both ranks end with the same parameters,
    and model.pt converts to its int8 form and evaluates."""
    ddp_cfg, _ = more_runs["qat"]
    out = _ran(ddp_cfg)
    ranks = [torch.load(out / f"params.rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0] and _max_diff(*ranks) == 0
    ev = more_runs["qat_eval"]
    if isinstance(ev, Exception):
        raise ev
    assert ev["form"] == "int8" and 0 <= ev["acc_lq"] <= 1 and _is_count_of(ev["acc_lq"], N_TEST)
