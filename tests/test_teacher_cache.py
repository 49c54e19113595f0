"""The teacher's soft-target cache: a hit is seen to be a hit (f never runs, the file is not rewritten),
each part of the key makes a miss, a corrupt file is rebuilt, and the logits a student learns from are
f(x) computed here by hand, cached or not, in fp32 and in bf16.

f is a resnet8 trained for 16 steps (a few seconds); runs are 1-2 epochs of 2 steps on 64 items of 16 px.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from cqd.degradations import parse_degradation
from cqd.engine import teachers as teachers_mod
from cqd.engine.schema import run_config
from cqd.engine.teachers import Teachers
from cqd.engine.trainer import train
from cqd.files import load_checkpoint
from cqd.models import create_model
from cqd.tasks.classification.data import build_datasets
from helpers import tiny_cfg


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cache-teacher")
    train(tiny_cfg(root, "f", method__name="hq", data__train_subset=256, train__epochs=2, train__max_steps_per_epoch=8))
    return str(root / "f" / "model.pt")


class Spy:
    """Counts f's forward calls and the passes that fill a cache table; records the teacher logits (as
    the teachers give them, before Fabric's bf16-mixed casts the method's inputs) and dataset indices
    of every training step."""

    def __init__(self, monkeypatch):
        self.forwards, self.passes, self.steps, self.z = 0, 0, [], []
        real_load, real_pass, real_call = teachers_mod.load_model, Teachers._pass, Teachers.__call__

        def load(*a, **k):
            model, ck = real_load(*a, **k)
            model.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))
            return model, ck

        def pass_(*a, **k):
            self.passes += 1
            return real_pass(*a, **k)

        def call(teachers, batch, pair, epoch):
            logits, features = real_call(teachers, batch, pair, epoch)
            self.steps.append((pair.index.cpu(), logits[0].detach().cpu().clone()))
            self.z.append((epoch, pair.index.cpu(), pair.z.cpu()))
            return logits, features

        monkeypatch.setattr(teachers_mod, "load_model", load)
        monkeypatch.setattr(Teachers, "_pass", pass_)
        monkeypatch.setattr(Teachers, "__call__", call)

    def reset(self):
        self.forwards, self.passes, self.steps, self.z = 0, 0, [], []

    def used(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, logits) of every step, concatenated."""
        return torch.cat([i for i, _ in self.steps]), torch.cat([t for _, t in self.steps])


def by_hand(teacher: str, cfg: dict, index: torch.Tensor, bf16: bool = False, view: str = "full") -> torch.Tensor:
    """f(x) for dataset items `index`, computed here: the items' pixels / 255, the run's x degradation
    (data.hq_degradation with data.seed, as the twin tests define it), normalized, through a fresh copy of f."""
    rc = run_config(copy.deepcopy(cfg))
    _, _, base, _ = build_datasets(rc)
    ck = load_checkpoint(teacher)
    f = create_model(ck["model_name"], num_classes=ck["num_classes"], in_chans=ck["in_chans"])
    f.load_state_dict(ck["model"])
    f.eval()
    items = [base[int(i)] for i in index]
    x = torch.stack([torch.as_tensor(it[view]) for it in items]).float() / 255
    x = parse_degradation(rc.data.hq_degradation)(x, index, rc.data.seed, None)[0]
    # Fashion-MNIST's own statistics; ImageNet's for photo datasets (CUB)
    mean, std = (((0.286,), (0.353,)) if rc.data.name == "fashion_mnist"
                 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return f((x - mean) / std).float()


def tables(cache: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted(cache.glob("teacher-*.pt"))}


def test_fresh_twins_each_epoch_reuse_the_cached_table_and_f_never_runs(teacher, tmp_path, monkeypatch, capsys):
    """Fresh z draws every epoch (x fixed): the table of the first run is a hit, f is not run at all,
    and every step's teacher logits are f(x) of its own items."""
    spy = Spy(monkeypatch)
    train(tiny_cfg(tmp_path, "first", teacher__checkpoint=teacher))
    assert spy.passes == 1 and "computed and cached" in capsys.readouterr().out
    before = tables(tmp_path / "cache")
    assert len(before) == 1

    spy.reset()
    cfg = tiny_cfg(tmp_path, "fresh", teacher__checkpoint=teacher, data__degradation="noise:std=0.2",
                   data__fresh_each_epoch=True, train__epochs=2)
    train(copy.deepcopy(cfg))
    assert "teacher 0 logits: cache hit" in capsys.readouterr().out
    assert spy.passes == 0 and spy.forwards == 0, (spy.passes, spy.forwards)
    assert tables(tmp_path / "cache") == before  # the same file, not rewritten
    # the twins really were fresh: an item seen in both epochs got another z in epoch 2 (else the case is moot)
    z = {(e, int(i)): zi for e, index, zs in spy.z for i, zi in zip(index, zs)}
    both = [i for (e, i) in z if e == 0 and (1, i) in z]
    assert both and all(not torch.equal(z[0, i], z[1, i]) for i in both)
    index, used = spy.used()
    assert len(index) == 2 * 2 * 16
    assert torch.allclose(used, by_hand(teacher, cfg, index), atol=1e-4)


def test_a_tapped_teacher_runs_once_over_x_for_its_logits_and_its_maps(teacher, tmp_path, monkeypatch, capsys):
    """FitNet taps f: on a cache miss one pass over the training items gives both the logits table and the maps; on
    a hit one pass gives the maps; maps over train.feature_cache_mb are not kept by the logits pass."""
    spy, kept = Spy(monkeypatch), []
    counted = Teachers._pass

    def pass_(self, *a, **k):
        out = counted(self, *a, **k)
        kept.append(sum(m.numel() for m in out[2].values()))
        return out

    monkeypatch.setattr(Teachers, "_pass", pass_)
    fitnet = {"teacher__checkpoint": teacher, "method__name": "fitnet"}
    train(tiny_cfg(tmp_path, "miss", **fitnet))
    out = capsys.readouterr().out
    assert "computed and cached" in out and "feature maps: computed once" in out
    assert spy.passes == 1 and kept[0] > 0, (spy.passes, kept)
    spy.reset(), kept.clear()
    train(tiny_cfg(tmp_path, "hit", **fitnet))
    assert "cache hit" in capsys.readouterr().out and spy.passes == 1 and kept[0] > 0
    spy.reset(), kept.clear()
    train(tiny_cfg(tmp_path, "big", train__feature_cache_mb=0, data__image_size=24, **fitnet))  # a miss: new size
    out = capsys.readouterr().out
    assert "computed and cached" in out and "computed every step" in out and kept == [0], kept


def _changed(tmp_path: Path, teacher: str, cub_root: Path | None, part: str) -> tuple[dict, dict, str]:
    """(base config, the same run with one key part changed, the view f sees in the changed run)."""
    short = {"teacher__checkpoint": teacher}
    if part == "view":  # CUB's box crop differs from the full image, so f(x) differs too
        short = {"data__name": "cub", "data__root": str(cub_root), "data__train_subset": None,
                 "data__test_subset": None, "train__batch_size": 2, "method__init": "scratch",
                 "teacher__checkpoint": teacher}
        return tiny_cfg(tmp_path, "base", **short), tiny_cfg(tmp_path, "changed", teacher__view="crop", **short), "crop"
    if part == "data_seed":  # the seed matters once x is degraded (a noisy teacher view)
        short["data__hq_degradation"] = "noise:std=0.1"
    changes = {"data_seed": {"data__seed": 1}, "image_size": {"data__image_size": 24},
               "precision": {"train__precision": "bf16-mixed"}}[part]
    return tiny_cfg(tmp_path, "base", **short), tiny_cfg(tmp_path, "changed", **short, **changes), "full"


@pytest.fixture(scope="module")
def cub_teacher(tmp_path_factory) -> tuple[str, Path]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_data_loaders import make_cub

    root = tmp_path_factory.mktemp("cub")
    make_cub(root / "cub")
    cfg = tiny_cfg(root, "f", method__name="hq", data__name="cub", data__root=str(root / "cub"),
                   data__train_subset=None, data__test_subset=None, train__batch_size=2, train__max_steps_per_epoch=3)
    train(cfg)
    return str(root / "f" / "model.pt"), root / "cub"


@pytest.mark.parametrize("part", ["data_seed", "image_size", "view", "precision"])
def test_each_part_of_the_key_makes_a_miss(part, teacher, cub_teacher, tmp_path, monkeypatch, capsys):
    """Changing one part of the key computes a new table (f runs, a second file appears, the first is
    untouched), and the new table holds f(x) of the changed setting, computed by hand."""
    f = cub_teacher[0] if part == "view" else teacher
    base, changed, view = _changed(tmp_path, f, cub_teacher[1], part)
    spy = Spy(monkeypatch)
    train(copy.deepcopy(base))
    assert spy.passes == 1
    first = tables(tmp_path / "cache")
    capsys.readouterr()

    spy.reset()
    train(copy.deepcopy(changed))
    assert "computed and cached" in capsys.readouterr().out, f"changing {part} hit the old table"
    assert spy.passes == 1
    now = tables(tmp_path / "cache")
    assert len(now) == 2 and all(now[p] == t for p, t in first.items())
    index, used = spy.used()
    want = by_hand(f, changed, index, bf16=part == "precision", view=view)
    if part == "precision":  # bf16 rounding: see test_cached_and_on_the_fly_logits_agree_under_bf16
        scale = float(want.abs().max())
        assert torch.allclose(used, want, atol=BF16_ATOL * scale)
        assert (used - by_hand(f, base, index)).abs().max() > FP32_NOISE * scale  # not the fp32 table
    else:
        assert torch.allclose(used, want, atol=1e-4)
        other = by_hand(f, base, index, view="full")
        if part != "image_size":
            assert not torch.allclose(want, other, atol=1e-3), "the change does not change f(x): the case is moot"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no_logits", "not_a_tensor"])
def test_a_corrupt_cache_file_is_rebuilt_not_a_crash(damage, teacher, tmp_path, monkeypatch, capsys):
    spy = Spy(monkeypatch)
    train(tiny_cfg(tmp_path, "first", teacher__checkpoint=teacher))
    [path] = tables(tmp_path / "cache")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 50)
    elif damage == "no_logits":
        torch.save({"something": torch.zeros(3)}, path)
    else:
        torch.save({"logits": [0.0, 1.0]}, path)
    capsys.readouterr()
    spy.reset()
    cfg = tiny_cfg(tmp_path, "second", teacher__checkpoint=teacher)
    with pytest.warns(UserWarning, match=f"{path}: unreadable teacher cache .*; computing it again"):
        train(copy.deepcopy(cfg))
    assert f"teacher 0 logits: computed and cached ({tmp_path / 'cache'}/{path.name})" in capsys.readouterr().out
    assert spy.passes == 1 and list(tables(tmp_path / "cache")) == [path]
    table = load_checkpoint(path)["logits"]  # a complete file again
    index, used = spy.used()
    hand = by_hand(teacher, cfg, index)
    assert torch.allclose(used, hand, atol=1e-4) and torch.allclose(table[index], hand, atol=1e-4)


# bf16 keeps 8 significant bits: a value is rounded to a relative 2^-9 (~0.2%) and each of resnet8's
# ~9 layers rounds its output again (here bf16 f(x) differs from fp32 f(x) by ~0.4% of the largest
# logit). Cached and on-the-fly f(x) are the same computation in other batch sizes (32 vs 16), which
# may pick kernels that accumulate in another order; 2% of the largest logit allows several such
# roundings (on this machine the two were bit-identical) and is far below the gaps between classes.
# That the values are bf16 at all is checked apart: they must differ from fp32 f(x) by more than
# FP32_NOISE of the largest logit, which fp32 rounding in another kernel order never reaches.
BF16_ATOL = 0.02
FP32_NOISE = 1e-3


def test_cached_and_on_the_fly_logits_agree_under_bf16(teacher, tmp_path, monkeypatch, capsys):
    """bf16-mixed: the cached table and f run on each batch (`train.cache_teacher: false`) give the
    student the same logits within bf16's rounding, and both really are bf16 (not fp32) values."""
    spy = Spy(monkeypatch)
    cached_cfg = tiny_cfg(tmp_path, "cached", teacher__checkpoint=teacher, train__precision="bf16-mixed")
    train(copy.deepcopy(cached_cfg))
    assert spy.passes == 1
    index, cached = spy.used()
    spy.reset()
    train(tiny_cfg(tmp_path, "live", teacher__checkpoint=teacher, train__precision="bf16-mixed",
                   train__cache_teacher=False))
    live_index, live = spy.used()
    assert spy.passes == 0 and spy.forwards == 2  # f ran once per step
    assert torch.equal(index, live_index)  # same items in the same order: same sampler
    scale = float(cached.abs().max())
    assert torch.allclose(cached, live, atol=BF16_ATOL * scale), (cached - live).abs().max() / scale
    assert torch.allclose(cached, by_hand(teacher, cached_cfg, index, bf16=True), atol=BF16_ATOL * scale)
    fp32 = by_hand(teacher, cached_cfg, index)
    for got in (cached, live):  # fp32 kernels in another order differ by ~1e-6 of the scale, bf16 by ~4e-3
        assert (got - fp32).abs().max() > FP32_NOISE * scale, "not computed under bf16 autocast"
    assert (cached.argmax(1) == fp32.argmax(1)).float().mean() > 0.9


def test_cache_teacher_false_runs_f_every_step_writes_no_table_and_trains_the_same_student(teacher, tmp_path,
                                                                                         monkeypatch, capsys):
    spy = Spy(monkeypatch)
    res_cached = train(tiny_cfg(tmp_path, "cached", teacher__checkpoint=teacher, train__epochs=2))
    spy.reset()
    cfg = tiny_cfg(tmp_path, "live", teacher__checkpoint=teacher, train__epochs=2, train__cache_teacher=False,
                   cache_dir=str(tmp_path / "cache-live"))
    capsys.readouterr()
    res = train(copy.deepcopy(cfg))
    assert "teacher 0 logits" not in capsys.readouterr().out
    assert spy.passes == 0 and spy.forwards == 4  # 2 epochs x 2 steps
    assert not (tmp_path / "cache-live").exists() or not list((tmp_path / "cache-live").glob("teacher-*.pt"))
    index, used = spy.used()
    assert torch.allclose(used, by_hand(teacher, cfg, index), atol=1e-4)
    a, b = (load_checkpoint(tmp_path / n / "model.pt")["model"] for n in ("cached", "live"))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert res["history"][-1]["loss_kd"] == pytest.approx(res_cached["history"][-1]["loss_kd"], rel=1e-5)
