"""Paths the README promises and no other test ran: SIGTERM and a second Ctrl-C inside a step, resume
with fresh twins and with bf16, the settings a resume accepts, `train.eval_every`, the crop/full
views end to end, `cqd show-degradations` and `cqd demo`, the out-of-memory message, and the CPU's
bf16 detection itself.

Runs are tiny (64 Fashion-MNIST items of 16 px, 2-3 epochs of 2-3 steps) and fp32 ("32-true", the same
numbers on every CPU) except where bf16 is the point.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cqd.cli import main
from cqd.engine import precision, trainer
from cqd.engine.schema import run_config
from cqd.engine.teachers import Teachers
from cqd.engine.trainer import Run, train
from cqd.files import load_checkpoint
from cqd.models import create_model
from cqd.tasks.classification.data import build_datasets
from helpers import interrupt_after_epoch, nested, tiny_cfg

FMNIST_MEAN, FMNIST_STD = 0.286, 0.353
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_cfg(root: Path, name: str, **over) -> dict:
    return tiny_cfg(root, name, **{"train__epochs": 2, "train__max_steps_per_epoch": 3, "method__name": "lq", **over})


def as_args(cfg: dict) -> list[str]:
    """The config as `key=value` overrides for the CLI."""
    out = []

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out.append(f"{prefix}{k}={json.dumps(v)}")

    walk(cfg, "")
    return out


def weights(path) -> dict:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"weights differ in {differ[:5]}"


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in history]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("paths")


@pytest.fixture(scope="module")
def reference(root) -> dict:
    """The uninterrupted fp32 run (method lq) that the SIGTERM and double-Ctrl-C runs must equal."""
    res = train(make_cfg(root, "ref"))
    return {"result": res, "dir": root / "ref"}


@pytest.fixture(scope="module")
def teacher(root) -> str:
    train(make_cfg(root, "f", method__name="hq", train__max_steps_per_epoch=4))
    return str(root / "f" / "model.pt")


# --- SIGTERM, and a second Ctrl-C inside a step ------------------------------------------------

# Runs `cqd.cli.main(argv[3:])`; inside its n-th optimizer step (after the update, before the loop
# counts it) it writes `marker` and waits for the file `marker`.go, which the test writes after it
# sent SIGTERM, so the signal certainly arrives inside that step.
SIGTERM_HOOK = r"""
import os, sys, time, torch
marker, nth = sys.argv[1], int(sys.argv[2])
real_step, count = torch.optim.SGD.step, [0]

def step(self, *a, **k):
    out = real_step(self, *a, **k)
    count[0] += 1
    if count[0] == nth:
        with open(marker, "w") as f:
            f.write("in step")
        t0 = time.monotonic()
        while not os.path.exists(marker + ".go") and time.monotonic() - t0 < 120:
            time.sleep(0.01)
        time.sleep(0.2)  # the handler has run by now (it runs in this thread between bytecodes)
    return out

torch.optim.SGD.step = step
from cqd.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@pytest.fixture
def child():
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=60)


def test_sigterm_inside_a_step_saves_exits_130_and_resume_equals_an_uninterrupted_run(root, reference, tmp_path,
                                                                                      child, capsys):
    """A scheduler's SIGTERM lands inside the 5th optimizer step (epoch 2, step 2): the child finishes
    that step, writes last.ckpt at epoch 1 step 2, exits 130 with the resume hint; `--resume` then ends
    with the weights, accuracies and history of the uninterrupted run."""
    cfg = make_cfg(root, "sigterm")
    out, marker, log = Path(cfg["out_dir"]), tmp_path / "marker", tmp_path / "log.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", SIGTERM_HOOK, str(marker), "5", "train", *as_args(cfg)],
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    child.append(proc)
    t0 = time.monotonic()
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() - t0 < 120, log.read_text(errors="replace")[-3000:]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    (tmp_path / "marker.go").write_text("")
    rc = proc.wait(timeout=120)
    text = log.read_text(errors="replace")
    assert rc == 130, f"rc {rc}:\n{text[-3000:]}"
    assert "stopping after this step" in text and "cqd: interrupted" in text and "Traceback" not in text, text[-3000:]
    assert f"interrupted: saved {out / 'last.ckpt'} at epoch 1 step 2; continue with --resume" in text, text[-3000:]
    ck = load_checkpoint(out / "last.ckpt")
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 2) and not (out / "model.pt").exists()

    capsys.readouterr()
    assert main(["train", *as_args(cfg), "--resume"]) == 0, capsys.readouterr().err
    assert_same_weights(out / "model.pt", reference["dir"] / "model.pt")
    res = json.loads((out / "result.json").read_text())
    ref = reference["result"]
    assert (res["acc_hq"], res["acc_lq"]) == (ref["acc_hq"], ref["acc_lq"])
    assert untimed(res["history"]) == untimed(ref["history"])


def test_a_second_ctrl_c_inside_a_step_keeps_the_last_consistent_checkpoint(root, reference, monkeypatch, capsys):
    """Two Ctrl-C inside the 5th optimizer step: the second stops at once, in the middle of the step, so
    the half-stepped weights are not saved; last.ckpt stays the end of epoch 1 and a resume equals the
    uninterrupted run."""
    cfg = make_cfg(root, "twice")
    out = Path(cfg["out_dir"])
    real, count, stopped_in_step = torch.optim.SGD.step, [0], []

    def step(self, *a, **k):
        result = real(self, *a, **k)
        count[0] += 1
        if count[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the first asks to stop after this step
            try:
                os.kill(os.getpid(), signal.SIGINT)  # the second stops now
            except KeyboardInterrupt:
                stopped_in_step.append(True)
                raise
        return result

    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        m.setattr(torch.optim.SGD, "step", step)
        with pytest.raises(KeyboardInterrupt):
            train(copy.deepcopy(cfg))
    assert stopped_in_step == [True], "the second signal did not stop the run inside the step"
    assert signal.getsignal(signal.SIGINT) is handler
    captured = capsys.readouterr()
    assert captured.err.count("stopping after this step") == 1
    assert f"interrupted during an optimizer step: kept the last checkpoint {out / 'last.ckpt'}" in captured.out
    ck = load_checkpoint(out / "last.ckpt")
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 0) and len(ck["history"]) == 1
    res = train(copy.deepcopy(cfg), resume=True)
    assert_same_weights(out / "model.pt", reference["dir"] / "model.pt")
    assert untimed(res["history"]) == untimed(reference["result"]["history"])


# --- resume with fresh twins and with bf16 -----------------------------------------------------

def _sigint_after_step(monkeypatch, n: int) -> None:
    real, count = torch.optim.SGD.step, [0]

    def step(self, *a, **k):
        result = real(self, *a, **k)
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", step)


@pytest.mark.parametrize("case", ["fresh_each_epoch", "bf16"])
def test_resume_mid_epoch_equals_an_uninterrupted_run(case, root, teacher, monkeypatch):
    """CQD with new noisy twins every epoch (fp32), or with bf16-mixed autocast (cached bf16 teacher
    logits): stopped after the 5th step (epoch 2, step 2) and resumed, it ends bit-exactly as the run
    that was never stopped."""
    over = ({"data__degradation": "noise:std=0.2", "data__fresh_each_epoch": True} if case == "fresh_each_epoch"
            else {"train__precision": "bf16-mixed"})
    common = {"method__name": "cqd", "teacher__checkpoint": teacher, "cache_dir": str(root / f"cache-{case}"), **over}
    ref = train(make_cfg(root, f"{case}-ref", **common))
    cfg = make_cfg(root, f"{case}-resumed", **common)
    with monkeypatch.context() as m:
        _sigint_after_step(m, 5)
        with pytest.raises(KeyboardInterrupt):
            train(copy.deepcopy(cfg))
    ck = load_checkpoint(Path(cfg["out_dir"]) / "last.ckpt")
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 2)
    res = train(copy.deepcopy(cfg), resume=True)
    assert res["precision"] == ref["precision"] == ("bf16-mixed" if case == "bf16" else "32-true")
    assert_same_weights(Path(cfg["out_dir"]) / "model.pt", root / f"{case}-ref" / "model.pt")
    assert untimed(res["history"]) == untimed(ref["history"])


# --- settings a resume accepts -----------------------------------------------------------------

def test_resume_accepts_the_settings_that_do_not_change_the_weights(root, tmp_path, monkeypatch):
    """Stopped after epoch 1, resumed with another name, cache_dir, eval_every, progress bar,
    num_workers and feature_cache_mb (all in the list of resumable changes): accepted, and the
    weights and losses are those of the run that kept its settings; only the extra evaluation shows."""
    ref = train(make_cfg(tmp_path, "ref", train__epochs=3))
    cfg = make_cfg(root, "accepted", train__epochs=3)
    with monkeypatch.context() as m:
        interrupt_after_epoch(m, 1)
        with pytest.raises(KeyboardInterrupt):
            train(copy.deepcopy(cfg))
    changed = nested(copy.deepcopy(cfg), name="renamed", cache_dir=str(tmp_path / "other-cache"),
                     train__eval_every=1, train__progress=True, data__num_workers=1, train__feature_cache_mb=7)
    res = train(changed, resume=True)
    assert res["name"] == "renamed" and res["config"]["data"]["num_workers"] == 1
    assert_same_weights(Path(cfg["out_dir"]) / "model.pt", tmp_path / "ref" / "model.pt")
    got, want = untimed(res["history"]), untimed(ref["history"])
    assert "acc_hq" not in got[0] and "acc_hq" in got[1]  # epoch 1 came from the checkpoint; eval_every=1 after
    assert [{k: v for k, v in r.items() if not k.startswith("acc_")} for r in got] == \
           [{k: v for k, v in r.items() if not k.startswith("acc_")} for r in want]
    assert (res["acc_hq"], res["acc_lq"]) == (ref["acc_hq"], ref["acc_lq"])


def test_resume_accepts_more_epochs_and_follows_the_longer_schedule(root, monkeypatch):
    cfg = make_cfg(root, "longer")
    with monkeypatch.context() as m:
        interrupt_after_epoch(m, 1)
        with pytest.raises(KeyboardInterrupt):
            train(copy.deepcopy(cfg))
    res = train(nested(copy.deepcopy(cfg), train__epochs=3), resume=True)
    assert [r["epoch"] for r in res["history"]] == [1, 2, 3]
    with open(Path(cfg["out_dir"]) / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]
    # the linear schedule now ends at epoch 3: lr * lr_final_ratio after the last of 9 steps
    assert res["history"][-1]["lr"] == pytest.approx(0.05 * 0.1)


# --- eval_every --------------------------------------------------------------------------------

def _top1_by_hand(model_state: dict, cfg: dict) -> float:
    """top-1 on the test subset's high-quality images (pixels / 255, Fashion-MNIST's normalization)."""
    rc = run_config(copy.deepcopy(cfg))
    _, test_ds, _, _ = build_datasets(rc)
    items = [test_ds[i] for i in range(len(test_ds))]
    x = torch.stack([torch.as_tensor(it["full"]) for it in items]).float() / 255
    y = torch.tensor([int(it["label"]) for it in items])
    model = create_model("resnet8", num_classes=10, in_chans=1)
    model.load_state_dict(model_state)
    model.eval()
    with torch.no_grad():
        pred = model((x - FMNIST_MEAN) / FMNIST_STD).argmax(1)
    return int((pred == y).sum()) / len(y)


def test_eval_every_evaluates_at_its_epochs_and_the_last_and_scores_that_epochs_weights(root):
    cfg = make_cfg(root, "every2", train__epochs=3, train__eval_every=2, train__max_steps_per_epoch=2)
    by_hand = {}

    def on_epoch(row):  # called after the epoch's checkpoint: last.ckpt holds this epoch's weights
        by_hand[row["epoch"]] = _top1_by_hand(weights(Path(cfg["out_dir"]) / "last.ckpt"), cfg)

    res = trainer.train(copy.deepcopy(cfg), on_epoch=on_epoch)
    evaluated = [r["epoch"] for r in res["history"] if "acc_hq" in r]
    assert evaluated == [2, 3]
    with open(Path(cfg["out_dir"]) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [bool(r["acc_hq"]) for r in rows] == [False, True, True]
    for r in res["history"]:
        if "acc_hq" in r:
            assert r["acc_hq"] == by_hand[r["epoch"]], (r["epoch"], r["acc_hq"], by_hand)


# --- crop/full views end to end (the paper's localization task) --------------------------------

@pytest.fixture(scope="module")
def cub(tmp_path_factory) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data_loaders import make_cub

    root = tmp_path_factory.mktemp("cub")
    make_cub(root / "cub")
    return root / "cub"


def test_crop_and_full_views_end_to_end(cub, tmp_path, monkeypatch, capsys):
    """`cqd train` with x = the box crop and z = the full image (T = none), no teacher checkpoint: f is
    trained on crops, the student gets f(crop) as soft targets and learns on full images with their
    boxes, and the result's acc_hq / acc_lq are top-1 on crops / full images, checked by hand."""
    seen = []
    real = Teachers.__call__

    def call(self, batch, pair, epoch):
        logits, features = real(self, batch, pair, epoch)
        seen.append((pair.x.cpu(), pair.z.cpu(), pair.box.cpu(), pair.index.cpu(), logits[0].cpu()))
        return logits, features

    monkeypatch.setattr(Teachers, "__call__", call)
    out = tmp_path / "loc"
    rc = main(["train", f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}", "data.name=cub", f"data.root={cub}",
               "data.image_size=16", "data.hq_view=crop", "data.lq_view=full", "data.degradation=none",
               "method.name=cqd", "train.epochs=2", "train.batch_size=2", "train.max_steps_per_epoch=3",
               "train.progress=false", "train.precision=32-true"])
    assert rc == 0, capsys.readouterr().err
    tcfg = json.loads((out / "teacher" / "config.json").read_text())
    assert (tcfg["method"]["name"], tcfg["data"]["hq_view"]) == ("hq", "crop")  # f learned on crops

    cfg = run_config({"data": {"name": "cub", "root": str(cub), "image_size": 16}})
    _, _, base, base_test = build_datasets(cfg)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def views(ds, index):
        items = [ds[int(i)] for i in index]
        crop, full = (torch.stack([torch.as_tensor(it[v]) for it in items]).float() / 255 for v in ("crop", "full"))
        box = torch.stack([torch.as_tensor(it["box"]) for it in items]).float()
        return (crop - mean) / std, (full - mean) / std, box, torch.tensor([int(it["label"]) for it in items])

    f = create_model("resnet8", num_classes=3, in_chans=3)
    f.load_state_dict(weights(out / "teacher" / "model.pt"))
    f.eval()
    assert len(seen) == 6
    for x, z, box, index, logits in seen:
        crop, full, want_box, _ = views(base, index)
        assert torch.allclose(x, crop, atol=1e-5) and torch.allclose(z, full, atol=1e-5)
        assert not torch.allclose(crop, full, atol=0.1)  # the fixture's crops differ from its full images
        assert torch.equal(box, want_box)
        with torch.no_grad():
            assert torch.allclose(logits, f(crop), atol=1e-4)

    g = create_model("resnet8", num_classes=3, in_chans=3)
    g.load_state_dict(weights(out / "model.pt"))
    g.eval()
    crop, full, _, y = views(base_test, range(len(base_test)))
    with torch.no_grad():
        want = {"acc_hq": int((g(crop).argmax(1) == y).sum()) / len(y),
                "acc_lq": int((g(full).argmax(1) == y).sum()) / len(y)}
    res = json.loads((out / "result.json").read_text())
    assert {k: res[k] for k in want} == want


# --- show-degradations and demo ----------------------------------------------------------------

def test_show_degradations_writes_one_row_per_spec_under_x(tmp_path, capsys):
    sizes = {}
    for specs in (["lowres:size=4"], ["lowres:size=4", "blur:sigma=1", "gray"]):
        out = tmp_path / f"grid{len(specs)}.png"
        rc = main(["show-degradations", "data.image_size=16", "--out", str(out), "-n", "3", "--specs", *specs])
        assert rc == 0, capsys.readouterr().err
        assert f"wrote {out}" in capsys.readouterr().out
        with Image.open(out) as im:
            im.load()
            assert im.format == "PNG"
            sizes[len(specs)] = im.size
            pixels = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32))
            assert pixels.std() > 10  # images, not a blank canvas
    (w1, h1), (w3, h3) = sizes[1], sizes[3]
    assert w1 == w3  # 3 images per row either way
    assert h3 / h1 == pytest.approx(4 / 2, rel=0.02)  # x + 3 rows vs x + 1 row


def test_demo_on_a_tiny_grid_writes_the_report_and_a_second_run_trains_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "quick"
    args = ["demo", f"out_dir={out}", "rows=[hq, lq, cqd]", "columns={lowres: {degradation: 'lowres:size=4'}}",
            "base.data.image_size=16", "base.data.train_subset=64",
            "base.data.test_subset=32", "base.train.epochs=1", "base.train.max_steps_per_epoch=2",
            "base.train.batch_size=16", "base.train.precision=32-true"]
    assert main(args) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    report = out / "report"
    for name in ("table.md", "table.png", "table.json", "runs.csv", "runs.json"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    assert f"report: {report}/table.md" in text
    md = (report / "table.md").read_text()
    runs = json.loads((report / "runs.json").read_text())
    assert sorted((r["name"], r["kind"]) for r in runs) == [
        ("lowres/cqd/s0", "train"), ("lowres/hq/s0", "eval"), ("lowres/lq/s0", "train"),
        ("teacher/full-none/s0", "train")]
    for row in ("A -> A upper bound", "A -> B no adaptation", "B -> B fine-tuning", "CQD -> B cqd (proposed)"):
        assert f"| {row} |" in md, md
    # each run in the report carries its cell's result.json numbers
    results = {}
    for p in out.rglob("result.json"):
        res = json.loads(p.read_text())
        results[res["name"]] = (res["acc_hq"], res["acc_lq"])
    assert {r["name"]: (r["acc_hq"], r["acc_lq"]) for r in runs} == results

    def no_training(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(trainer, "train", no_training)
    assert main(args) == 0, capsys.readouterr().err
    assert (report / "table.md").read_text() == md


# --- out of memory -----------------------------------------------------------------------------

def _real_cpu_oom(*a, **k):
    torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: the CPU allocator refuses at once
    raise AssertionError("the allocation succeeded")


def _cuda_style_oom(*a, **k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.parametrize("raise_oom", [_real_cpu_oom, _cuda_style_oom], ids=["cpu_allocator", "cuda"])
def test_out_of_memory_in_a_step_is_one_clear_error_and_exit_2(raise_oom, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Run, "_step", raise_oom)
    rc = main(["train", *as_args(make_cfg(tmp_path, "oom", train__epochs=1))])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.strip() == ("cqd: error: out of memory; lower train.batch_size, data.image_size or data.num_workers "
                           "(or use a bigger device)"), err


# --- the CPU's bf16 detection --------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU flags from /proc/cpuinfo (Linux)")
def test_cpu_bf16_detection_agrees_with_the_cpu_flags():
    """Native bf16 = the CPU (and kernel) report AVX512-BF16 or AMX-BF16 in /proc/cpuinfo; `auto` then
    trains in bf16-mixed on this CPU, else fp32. Nothing is monkeypatched."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert precision.cpu_has_bf16() is native, f"flags say native bf16 = {native}"
    t = run_config({"train": {"accelerator": "cpu"}}).train
    assert precision.resolve_precision(t) == ("bf16-mixed" if native else "32-true")
    assert precision.make_fabric(t)._precision.precision == ("bf16-mixed" if native else "32-true")
