"""The training engine on a few steps of Fashion-MNIST: every method learns, teacher initialisation,
the teacher cache, bit-exact resume after an interrupt, and the CLI's outputs.

One base run: 128 training items = 4 steps of 32, so every epoch sees the same items (in another order),
3 epochs; the teacher f is trained once per module (hq, resnet8) and shared.
"""
from __future__ import annotations

import copy
import csv
import functools
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from cqd.cli import main as cli_main
from cqd.data.paired import PairMaker
from cqd.engine import precision, trainer
from cqd.engine.model_files import load_model
from cqd.engine.schema import run_config
from cqd.engine.teachers import Teachers
from cqd.engine.trainer import train
from cqd.errors import ConfigError
from cqd.files import load_checkpoint
from cqd.methods.base import Method
from cqd.models import create_model
from cqd.tasks.classification import data as loaders
from cqd.tasks.classification.data import build_datasets, make_maker
from helpers import interrupt_after_epoch, nested

METHODS = ["hq", "lq", "augment", "staged", "cqd"]


def make_cfg(root: Path, name: str, **over) -> dict:
    """Like conftest's tiny_config, with a chosen folder (module-scoped fixtures share runs)."""
    cfg = {
        "name": name, "seed": 0, "out_dir": str(root / name), "cache_dir": str(root / "cache"), "model": "resnet8",
        "data": {"train_subset": 128, "test_subset": 64, "image_size": 32, "degradation": "lowres:size=8"},
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.05, "progress": False, "max_steps_per_epoch": 4,
                  "precision": "32-true"},  # the same numbers on every CPU (auto is bf16 where native)
        "method": {"name": "lq"},
    }
    return nested(cfg, **over)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="module")
def teacher(root) -> str:
    """f: resnet8 trained on A (hq) for 16 steps; its model.pt."""
    train(make_cfg(root, "teacher", method__name="hq", data__train_subset=256, train__epochs=2,
                   train__max_steps_per_epoch=8))
    return str(root / "teacher" / "model.pt")


@pytest.fixture(scope="module")
def reference(root, teacher) -> dict:
    """An uninterrupted CQD run: the loss-goes-down case for cqd and the target of the resume tests."""
    res = train(make_cfg(root, "ref", method__name="cqd", teacher__checkpoint=teacher))
    return {"result": res, "dir": root / "ref"}


def _weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _rows(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames), list(r)


def _total(row: dict) -> float:
    return sum(v for k, v in row.items() if k.startswith("loss_"))


# --- every method learns ------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_method_training_loss_goes_down(method, root, teacher, reference):
    if method == "cqd":
        res, out = reference["result"], reference["dir"]
    else:
        over = {"teacher__checkpoint": teacher} if method == "staged" else {}
        res = train(make_cfg(root, f"learn-{method}", method__name=method, **over))
        out = root / f"learn-{method}"
    h = res["history"]
    assert len(h) == 3
    first, last = h[0], h[-1]
    assert math.isfinite(_total(last)) and _total(last) < _total(first), [(_total(r)) for r in h]
    assert last["loss_ce"] < first["loss_ce"]
    assert 0.0 <= last["acc_hq"] <= 1.0 and 0.0 <= last["acc_lq"] <= 1.0
    # metrics.csv: one row per epoch, the method's named losses, lr and throughput
    cols, rows = _rows(out / "metrics.csv")
    assert len(rows) == 3 and [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"epoch", "lr", "images_per_s", "loss_ce"} <= set(cols)
    assert ("loss_kd" in cols) == (method == "cqd")
    assert float(rows[-1]["loss_ce"]) == pytest.approx(last["loss_ce"], rel=1e-6)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.05 * 0.1)  # linear decay to lr_final_ratio
    assert rows[-1]["acc_hq"] and not rows[0]["acc_hq"]  # evaluated at the end only (eval_every=0)


# --- initialisation from the teacher ------------------------------------------------------------

@pytest.fixture
def init_spy(monkeypatch):
    """The student's weights when the method is built (after any copy from the teacher)."""
    seen = {}
    real = Method.__init__

    @functools.wraps(real)
    def spy(self, student, *a, **k):
        seen["w"] = {n: v.detach().clone() for n, v in student.state_dict().items()}
        real(self, student, *a, **k)

    monkeypatch.setattr(Method, "__init__", spy)
    return seen


@pytest.mark.parametrize("method,init,from_teacher",
                         [("cqd", "auto", True), ("cqd", "scratch", False), ("staged", "auto", True)])
def test_student_initialisation(method, init, from_teacher, root, teacher, tmp_path, init_spy):
    train(make_cfg(tmp_path, "init", method__name=method, method__init=init, teacher__checkpoint=teacher,
                   train__epochs=1, train__max_steps_per_epoch=1))
    f = _weights(teacher)
    start = init_spy["w"]
    assert start.keys() == f.keys()
    assert all(torch.equal(start[k], f[k]) for k in f) == from_teacher
    if not from_teacher:  # the seeded fresh init, not some leftover
        torch.manual_seed(0)
        fresh = create_model("resnet8", 10, 1).state_dict()
        assert all(torch.equal(start[k], fresh[k]) for k in fresh)


@pytest.mark.parametrize("method,init", [("staged", "auto"), ("cqd", "teacher")])
def test_teacher_init_needs_same_architecture(method, init, teacher, tmp_path):
    cfg = make_cfg(tmp_path, "bad", model="resnet14", method__name=method, method__init=init,
                   teacher__checkpoint=teacher)
    with pytest.raises(ConfigError, match="architecture"):
        train(cfg)
    assert not (tmp_path / "bad" / "model.pt").exists()


def test_cqd_compression_trains_teacher_then_student(tmp_path):
    """teacher resnet14 -> student resnet8; no checkpoint given, so the engine trains f first."""
    res = train(make_cfg(tmp_path, "comp", method__name="cqd", teacher__model="resnet14", train__epochs=2))
    tpath = tmp_path / "comp" / "teacher" / "model.pt"
    assert res["teacher"] == str(tpath)
    assert load_checkpoint(tpath)["model_name"] == "resnet14"
    assert load_checkpoint(tmp_path / "comp" / "model.pt")["model_name"] == "resnet8"
    h = res["history"]
    assert all(math.isfinite(r["loss_kd"]) and r["loss_kd"] > 0 for r in h)
    assert _total(h[-1]) < _total(h[0])
    assert res["acc_lq"] is not None


# --- teacher cache --------------------------------------------------------------------------------

def test_teacher_cache_hits_misses_and_skips(teacher, tmp_path, monkeypatch, capsys):
    calls = []
    real = Teachers._pass

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(Teachers, "_pass", counting)
    cache = tmp_path / "cache"
    short = {"method__name": "cqd", "teacher__checkpoint": teacher, "train__epochs": 1, "train__max_steps_per_epoch": 1}

    def files():
        return sorted(cache.glob("teacher-*.pt"))

    train(make_cfg(tmp_path, "c1", **short))
    assert len(calls) == 1 and len(files()) == 1
    assert "computed and cached" in capsys.readouterr().out
    first, mtime = files()[0], files()[0].stat().st_mtime_ns

    # the cached soft targets are f(x) for the run's items (and only those)
    cfg = run_config(make_cfg(tmp_path, "c1", **short))
    train_ds, _, base, _ = build_datasets(cfg)
    table = load_checkpoint(first)["logits"]
    assert table.shape == (len(base), 10)
    used = torch.zeros(len(base), dtype=torch.bool)
    used[train_ds.indices] = True
    assert torch.isfinite(table[used]).all() and torch.isnan(table[~used]).all()
    f, _ = load_model(teacher)
    f.eval()
    maker = make_maker(cfg, base)
    idx = train_ds.indices[:3] + train_ds.indices[-2:]
    x, _, _ = maker.views(base.__getitems__(idx), "cpu")
    with torch.no_grad():
        direct = f(maker.normalize(x))
    assert torch.allclose(table[idx], direct, atol=1e-5)

    # an identical run (another out_dir) hits
    train(make_cfg(tmp_path, "c2", **short))
    assert len(calls) == 1 and files() == [first] and first.stat().st_mtime_ns == mtime
    assert "cache hit" in capsys.readouterr().out

    # another teacher (one weight changed) misses
    ck = load_checkpoint(teacher)
    ck["model"] = {k: v.clone() for k, v in ck["model"].items()}
    ck["model"]["head.bias"][0] += 0.01
    other = tmp_path / "other-teacher.pt"
    torch.save(ck, other)
    train(make_cfg(tmp_path, "c3", **{**short, "teacher__checkpoint": str(other)}))
    assert len(calls) == 2 and len(files()) == 2

    # another view for the teacher misses
    train(make_cfg(tmp_path, "c4", data__hq_degradation="blur:sigma=1", **short))
    assert len(calls) == 3 and len(files()) == 3

    # another training subset misses (the table only holds the run's items)
    train(make_cfg(tmp_path, "c5", data__train_subset=96, **short))
    assert len(calls) == 4 and len(files()) == 4

    # fresh random draws on the teacher's view each epoch: f runs on the fly, nothing cached
    capsys.readouterr()
    res = train(make_cfg(tmp_path, "c6", data__hq_degradation="noise:std=0.05", data__fresh_each_epoch=True, **short))
    assert len(calls) == 4 and len(files()) == 4
    assert math.isfinite(res["history"][-1]["loss_kd"])
    assert "teacher 0 logits" not in capsys.readouterr().out

    # fresh draws on z only: x is fixed, so the first table is reused
    train(make_cfg(tmp_path, "c7", data__fresh_each_epoch=True, **short))
    assert len(calls) == 4 and len(files()) == 4


def test_cached_and_on_the_fly_teacher_train_the_same_student(root, teacher, reference, monkeypatch):
    """The table is indexed by dataset index: training from it equals running f on each batch."""
    monkeypatch.setattr(PairMaker, "teacher_input_fixed", property(lambda self: False))
    res = train(make_cfg(root, "onthefly", method__name="cqd", teacher__checkpoint=teacher))
    a, b = _weights(reference["dir"] / "model.pt"), _weights(root / "onthefly" / "model.pt")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert res["history"][-1]["loss_kd"] == pytest.approx(reference["result"]["history"][-1]["loss_kd"], rel=1e-5)


# --- resume -------------------------------------------------------------------------------------

class _Tripwire:
    """Stands in for the training PairMaker; raises KeyboardInterrupt at (epoch, step) before the step."""

    def __init__(self, maker, epoch: int, step: int):
        self._maker, self._at, self._steps = maker, (epoch, step), {}

    def __getattr__(self, name):
        return getattr(self._maker, name)

    def __call__(self, batch, device, epoch=0):
        s = self._steps.get(epoch, 0)
        self._steps[epoch] = s + 1
        if (epoch, s) == self._at:
            raise KeyboardInterrupt
        return self._maker(batch, device, epoch)


def _interrupt_before(monkeypatch, epoch: int, step: int) -> None:
    made = []
    real = loaders.make_maker

    def make(cfg, base, *views):
        made.append(1)
        m = real(cfg, base, *views)
        return _Tripwire(m, epoch, step) if len(made) == 1 else m  # the training maker is made first

    monkeypatch.setattr(loaders, "make_maker", make)  # the classification task's maker


def _sigint_after_optimizer_step(monkeypatch, n: int) -> None:
    """SIGINT arrives right after the n-th optimizer update, before the loop has counted it."""
    real = torch.optim.SGD.step
    count = [0]

    def step(self, *a, **k):
        out = real(self, *a, **k)
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)


@pytest.mark.parametrize("how,ck_epoch,ck_step", [
    ("end_of_epoch", 1, 0),  # stopped after epoch 1 was checkpointed
    ("mid_epoch", 1, 2),  # stopped before the 3rd step of epoch 2
    ("sigint_in_step", 1, 2),  # Ctrl-C inside the 6th update: the loop finishes that step, then stops
])
def test_resume_is_bit_exact(how, ck_epoch, ck_step, root, teacher, reference, monkeypatch):
    cfg = make_cfg(root, f"resume-{how}", method__name="cqd", teacher__checkpoint=teacher)
    out = Path(cfg["out_dir"])
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        if how == "end_of_epoch":
            interrupt_after_epoch(m, 1)
        elif how == "mid_epoch":
            _interrupt_before(m, 1, 2)
        else:
            _sigint_after_optimizer_step(m, 6)
        with pytest.raises(KeyboardInterrupt):
            train(copy.deepcopy(cfg))
    assert signal.getsignal(signal.SIGINT) is handler  # the engine put the handlers back
    ck = load_checkpoint(out / "last.ckpt")
    assert (ck["epoch"], ck["step_in_epoch"]) == (ck_epoch, ck_step)
    assert len(ck["history"]) == ck_epoch
    assert not (out / "model.pt").exists()

    res = train(copy.deepcopy(cfg), resume=True)
    ref = reference["result"]
    want, got = _weights(reference["dir"] / "model.pt"), _weights(out / "model.pt")
    assert want.keys() == got.keys()
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run in {differ[:5]}"
    assert (res["acc_hq"], res["acc_lq"]) == (ref["acc_hq"], ref["acc_lq"])
    assert len(res["history"]) == 3
    for a, b in zip(res["history"], ref["history"]):
        assert ({k: v for k, v in a.items() if k != "images_per_s"}
                == {k: v for k, v in b.items() if k != "images_per_s"})
    _, rows = _rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_a_signal_during_the_last_evaluation_stops_the_caller_after_the_run_is_saved(root, teacher, reference,
                                                                                    monkeypatch):
    """SIGTERM after the last step's check (in the final evaluation) used to be swallowed: the run
    returned and a grid went on to its next cell. Now the run finishes, saves, then raises."""
    cfg = make_cfg(root, "sigterm-at-end", method__name="cqd", teacher__checkpoint=teacher)
    real = trainer.Run.evaluate

    def evaluate(self):
        if len(self.history) == cfg["train"]["epochs"] - 1:  # the last epoch's evaluation
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(trainer.Run, "evaluate", evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(cfg))
    assert signal.getsignal(signal.SIGTERM) is handler
    out = Path(cfg["out_dir"])
    res = json.loads((out / "result.json").read_text())  # complete and saved before stopping
    assert (res["acc_hq"], res["acc_lq"]) == (reference["result"]["acc_hq"], reference["result"]["acc_lq"])
    want, got = _weights(reference["dir"] / "model.pt"), load_model(out / "model.pt")[0].state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_train_then_eval(teacher, tmp_path, capsys):
    out = tmp_path / "cli"
    common = [f"cache_dir={tmp_path / 'cache'}", "data.train_subset=64", "data.test_subset=64", "train.batch_size=32",
              "train.progress=false"]
    rc = cli_main(["train", "name=cli", f"out_dir={out}", "method.name=cqd", f"teacher.checkpoint={teacher}",
                   "train.epochs=2", "train.max_steps_per_epoch=2", *common])
    assert rc == 0
    for name in ("model.pt", "last.ckpt", "result.json", "metrics.csv", "config.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    result = json.loads((out / "result.json").read_text())
    cols, rows = _rows(out / "metrics.csv")
    assert len(rows) == 2
    assert {"epoch", "lr", "images_per_s", "loss_ce", "loss_kd", "acc_hq", "acc_lq"} <= set(cols)
    for row, h in zip(rows, result["history"]):
        assert float(row["loss_kd"]) == pytest.approx(h["loss_kd"], rel=1e-6)
    capsys.readouterr()

    rc = cli_main(["eval", "--model", str(out / "model.pt"), *common])
    assert rc == 0
    text = capsys.readouterr().out
    ev = json.loads(text[text.index("{"):])
    assert ev["n_test"] == 64
    assert ev["acc_hq"] == pytest.approx(result["acc_hq"], abs=1e-6)
    assert ev["acc_lq"] == pytest.approx(result["acc_lq"], abs=1e-6)


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_precision_on_cpu_follows_native_bf16(native_bf16, expected, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native_bf16)
    t = run_config({"train": {"accelerator": "cpu"}}).train
    assert precision.make_fabric(t)._precision.precision == expected
    assert precision.make_fabric(t.model_copy(update={"precision": "32-true"}))._precision.precision == "32-true"


def test_bf16_mixed_on_cpu_trains_and_keys_its_own_teacher_cache(root, teacher, tmp_path, capsys):
    """bf16 autocast on the CPU (what `auto` picks on CPUs with native bf16): CQD learns, and f(x)
    computed under bf16 is cached apart from the fp32 table."""
    cfg = make_cfg(root, "bf16", method__name="cqd", teacher__checkpoint=teacher, train__precision="bf16-mixed",
                   train__epochs=2, cache_dir=str(tmp_path))
    res = train(cfg)
    losses = [h["loss_ce"] for h in res["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert "computed and cached" in capsys.readouterr().out
    train(make_cfg(root, "fp32", method__name="cqd", teacher__checkpoint=teacher, train__epochs=1,
                   cache_dir=str(tmp_path)))
    assert "computed and cached" in capsys.readouterr().out  # not the bf16 table
