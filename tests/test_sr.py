"""Task `sr`: the SR protocol (bicubic, Y channel, PSNR/SSIM), the patch maker, the EDSR model, the
distillation methods (LSFD's attention and the feature terms' gradient) and bit-exact resume."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cqd.engine.model_files import load_model
from cqd.engine.schema import run_config
from cqd.engine.trainer import train
from cqd.errors import ConfigError
from cqd.experiments.schema import load_grid_config
from cqd.methods import METHODS, Step
from cqd.methods.lsfd import attention, local_distance
from cqd.models import create_model
from cqd.tasks.sr import pipeline as sr
from cqd.tasks.sr.data import SRConfig, SRImages
from helpers import interrupt_after_epoch, nested

# PSNR-Y of PIL bicubic (kd-family-notes.md, LSFD section), x2 and x4: `sr.resize: pil` (MATLAB's, the default, is
# checked against a hand computation in test_reference_defaults.py)
REFERENCE = {"astronaut": (31.71, 26.84), "chelsea": (35.25, 31.47), "coffee": (30.59, 27.29)}


@pytest.mark.parametrize("scale", [2, 4])
def test_bicubic_baseline_reproduces_the_reference_psnr(scale):
    cfg = run_config({"task": "sr", "model": "edsr:blocks=1,feats=4",
                      "sr": {"scale": scale, "test": list(REFERENCE), "train": ["page"], "resize": "pil"}})
    test = SRImages(cfg.sr, "test")
    maker = sr.PatchMaker(cfg, test)
    for i, name in enumerate(test.names):
        _, hr, bic = maker.whole(i, "cpu")
        p, s = sr.sr_metrics(bic, hr, scale)
        assert abs(float(p[0]) - REFERENCE[name][scale // 4]) <= 0.01, name
        assert 0.5 < float(s[0]) < 1


def test_psnr_of_known_noise_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 40, 40, generator=g, dtype=torch.float64) * 200 + 20
    sign = torch.where(torch.rand(2, 1, 40, 40, generator=g) < 0.5, -1.0, 1.0).double()
    for sigma in (1.0, 4.0):
        got = sr.psnr(target + sigma * sign, target)
        assert torch.allclose(got, torch.full((2,), 10 * math.log10(255 ** 2 / sigma ** 2), dtype=torch.float64))
    # and the whole path (8-bit rounding, Y, shave) against numpy: RGB offsets of k/255 move Y by a known amount
    rgb = torch.rand(1, 3, 20, 24, generator=g, dtype=torch.float64).mul(200).add(10).round().div(255)
    k = torch.tensor([3.0, -2.0, 5.0]).view(1, 3, 1, 1).double() / 255
    p, _ = sr.sr_metrics(rgb + k, rgb, shave=2)
    dy = (65.481 * 3 - 128.553 * 2 + 24.966 * 5) / 255
    assert float(p[0]) == pytest.approx(10 * math.log10(255 ** 2 / dy ** 2), abs=1e-5)


def test_y_channel_follows_bt601():
    colors = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.25, 0.75]],
                          dtype=torch.float64).T.reshape(1, 3, 1, 6)
    y = sr.y_channel(colors).flatten().tolist()
    expect = [16, 235, 16 + 65.481, 16 + 128.553, 16 + 24.966, 16 + 65.481 * 0.5 + 128.553 * 0.25 + 24.966 * 0.75]
    assert y == pytest.approx(expect, abs=1e-9)


def test_lsfd_attention_is_larger_where_the_difference_is_larger():
    d = torch.tensor([[0.1, 0.2], [0.4, 0.8]]).view(1, 1, 2, 2)
    w = attention(d, tau=1.0).flatten()
    assert torch.all(w[1:] > w[:-1]) and float(w.mean()) == pytest.approx(1.0)
    assert torch.allclose(attention(d, tau=1e6), torch.ones_like(d), atol=1e-4)  # tau -> inf: uniform
    # fixed maps: the student differs from the teacher only in the top-left corner
    g = torch.Generator().manual_seed(1)
    ft = torch.randn(1, 4, 12, 12, generator=g)
    fs = ft.clone()
    fs[..., :4, :4] = torch.randn(1, 4, 4, 4, generator=g)
    for norm in ("local", "none"):
        dist = local_distance(fs, ft, 3, norm)
        w = attention(dist, 1.0)[0, 0]
        assert float(w[:3, :3].min()) > float(w[7:, 7:].max()), norm
        assert float(dist[0, 0, 8:, 8:].abs().max()) < 1e-3


def test_local_distance_is_the_windowed_standardized_mse():
    """The pooled formula equals the direct one: standardize the window at p by its own stats, then the mean square."""
    g = torch.Generator().manual_seed(2)
    fs, ft = (torch.randn(1, 3, 7, 7, generator=g, dtype=torch.float64),
              torch.randn(1, 3, 7, 7, generator=g, dtype=torch.float64))
    d = local_distance(fs, ft, 3, "local", eps=1e-4)
    ws, wt = fs[0, :, 2:5, 2:5], ft[0, :, 2:5, 2:5]  # the window at p = (3, 3)
    a = (ws - ws.mean()) / (ws.var(unbiased=False) + 1e-4).sqrt()
    b = (wt - wt.mean()) / (wt.var(unbiased=False) + 1e-4).sqrt()
    assert float(d[0, 0, 3, 3]) == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-9)


def _tiny_method(name: str, **params):
    s = create_model("edsr:blocks=2,feats=4,scale=2", 3, 3)
    t = create_model("edsr:blocks=2,feats=6,scale=2", 3, 3)
    cls = METHODS.get(name)
    method = cls(s, cls.Params(**params), [t], torch.zeros(2, 3, 8, 8))
    return method, t


@pytest.mark.parametrize("name", ["lsfd", "sr_fitnet"])
def test_the_feature_loss_sends_gradient_to_the_student(name):
    method, teacher = _tiny_method(name)
    g = torch.Generator().manual_seed(0)
    z, y = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    from cqd.models.taps import FeatureTaps

    taps = FeatureTaps(teacher, method.teacher_taps[0])
    with torch.no_grad():
        teacher(z + 0.3)  # a teacher that differs from the student
    from cqd.data.paired import Pair

    step = Step(Pair(y, z, y, torch.zeros(2, 4), torch.arange(2)), [], [dict(taps.out)])
    _, losses = method(step)
    assert losses["loss_feat"].requires_grad
    losses["loss_feat"].backward()
    head = method.student.head.weight.grad  # before every tapped block: reached only through the feature term's path
    assert head is not None and float(head.abs().sum()) > 0
    assert all(float(r.weight.grad.abs().sum()) > 0 for r in method.regressors)
    assert method.student.tail[1].weight.grad is None  # after the taps: the feature term does not reach it


def test_patch_and_whole_image_paths_agree_in_shape_and_alignment():
    cfg = run_config({"task": "sr", "model": "edsr:blocks=1,feats=4",
                      "sr": {"scale": 3, "patch": 10, "patches_per_epoch": 8,
                             "train": ["page", "text"], "test": ["coins"]}})
    train_set, test_set = SRImages(cfg.sr, "train"), SRImages(cfg.sr, "test")
    # coded images: LR pixel (i, j) = HR pixel (3i, 3j), so an aligned pair has z == x[..., ::3, ::3]
    for k, hr in enumerate(train_set.hr):
        train_set.lr[k] = hr[:, ::3, ::3].clone()
    batch = {"index": torch.arange(8)}
    plain = sr.PatchMaker(cfg.model_copy(update={"sr": cfg.sr.model_copy(update={"augment": False})}),
                          train_set)(batch, "cpu")
    assert plain.z.shape == (8, 3, 10, 10) and plain.x.shape == (8, 3, 30, 30) and plain.y is plain.x
    assert torch.equal(plain.z, plain.x[..., ::3, ::3])
    aug = sr.PatchMaker(cfg, train_set)(batch, "cpu")
    for i in range(8):  # the same symmetry on both sides of each pair, and a different one on some
        same = [k for k in range(8) if torch.equal(aug.z[i], sr.symmetry(plain.z[i], k))
                and torch.equal(aug.x[i], sr.symmetry(plain.x[i], k))]
        assert same, i
    assert not torch.equal(aug.z, plain.z)
    square = torch.arange(9).view(1, 3, 3)  # the 8 symmetries are distinct
    assert len({tuple(sr.symmetry(square, k).flatten().tolist()) for k in range(8)}) == 8
    model = create_model(sr.model_name(cfg, cfg.model), 3, 3)
    assert model(plain.z).shape == plain.x.shape
    lr, hr, bic = sr.PatchMaker(cfg, test_set).whole(0, "cpu")
    assert model(lr).shape == hr.shape == bic.shape


def test_model_scale_comes_from_the_task_and_must_agree():
    cfg = run_config({"task": "sr", "model": "edsr:blocks=1,feats=4", "sr": {"scale": 2}})
    assert sr.model_name(cfg, "edsr:blocks=1,feats=4") == "edsr:blocks=1,feats=4,scale=2"
    with pytest.raises(ConfigError, match="built for scale 4 but sr.scale is 2"):
        sr.model_name(cfg, "edsr:blocks=1,feats=4,scale=4")
    with pytest.raises(ConfigError, match="image-to-image model"):
        sr.model_name(cfg, "resnet8")
    with pytest.raises(ConfigError, match="no key 'block'"):
        run_config({"model": "edsr:block=2"})
    with pytest.raises(ConfigError, match="data.val_fraction=0.1 has no meaning for task sr"):
        sr.build_datasets(run_config({"task": "sr", "data": {"val_fraction": 0.1}}))
    with pytest.raises(ConfigError, match="share chelsea"):
        run_config({"task": "sr", "sr": {"train": ["chelsea", "page"]}})


def _sr_cfg(root, name, **over):
    cfg = {"name": name, "seed": 0, "out_dir": str(root / name), "cache_dir": str(root / "cache"), "task": "sr",
           "model": "edsr:blocks=1,feats=4", "teacher": {"model": "edsr:blocks=1,feats=6", "seed": 0},
           "sr": {"scale": 2, "patch": 8, "patches_per_epoch": 16, "train": ["text", "clock"], "test": ["page"]},
           "method": {"name": "lsfd", "lsfd": {"points": 1}},
           "train": {"epochs": 2, "batch_size": 8, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
                     "progress": False, "precision": "32-true", "schedule": "cosine"}}
    return nested(cfg, **over)


def test_sr_runs_resume_bit_exactly(tmp_path, monkeypatch):
    ref = train(_sr_cfg(tmp_path, "ref"))
    assert ref["psnr"] is not None and ref["psnr_bicubic"] > 20
    cfg = _sr_cfg(tmp_path, "cut", teacher={"model": "edsr:blocks=1,feats=6", "seed": 0,
                                             "checkpoint": str(tmp_path / "ref" / "teacher" / "model.pt")})
    interrupt_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    res = train(cfg, resume=True)
    a, _ = load_model(tmp_path / "ref" / "model.pt")
    b, ck = load_model(tmp_path / "cut" / "model.pt")
    assert ck["model_name"] == "edsr:blocks=1,feats=4,scale=2"
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert res["psnr"] == ref["psnr"] and res["ssim"] == ref["ssim"]


def test_sr_grid_evaluates_the_shared_teacher_and_writes_the_table(tmp_path):
    from cqd.api import evaluate, table

    base = _sr_cfg(tmp_path, "base", method={"name": "sr_l1"})
    base["train"]["epochs"] = 1
    grid = {"name": "sr tiny", "out_dir": str(tmp_path / "grid"), "seeds": [0, 1], "base": base,
            "columns": {"x2": {"set": {"sr.scale": 2}}},
            "rows": [{"id": "teacher", "set": {"method.name": "sr_teacher"}}, "sr_l1", "sr_okd"],
            "reference": "published: other data"}
    out = table(load_grid_config(grid))
    md = out["markdown"]
    assert "| bicubic |" in md and "| teacher (L1) |" in md and "| output KD |" in md and "published: other data" in md
    teachers = list((tmp_path / "grid" / "teachers").iterdir())
    # one f for both seeds
    assert len(teachers) == 1 and [p.name for p in teachers[0].iterdir() if p.is_dir()] == ["s0"]
    cell = json.loads((tmp_path / "grid" / "cells" / "x2" / "teacher" / "s1" / "result.json").read_text())
    f = json.loads((teachers[0] / "s0" / "result.json").read_text())
    assert cell["psnr"] == pytest.approx(f["psnr"])  # the teacher row evaluates the shared f
    assert (tmp_path / "grid" / "report" / "crops.png").is_file()
    from cqd.experiments.grid import collect
    from cqd.tasks.sr.report import crops_figure

    g = load_grid_config(grid)
    (column, titles), = crops_figure(collect(g), g, tmp_path / "crops.png")
    assert column == "x2" and [t.split("\n")[0] for t in titles] == ["bicubic", "student alone", "distilled (sr_okd)",
                                                                      "teacher", "HR (page)"]
    ev = evaluate(str(teachers[0] / "s0" / "model.pt"), run_config(base))
    assert ev["psnr"] == pytest.approx(f["psnr"]) and ev["scale"] == 2
    # `cqd eval` measures in float32 whatever the training precision (Fabric's bf16 autocast would shift PSNR)
    bf16 = evaluate(str(teachers[0] / "s0" / "model.pt"), run_config(nested(base, train__precision="bf16-mixed")))
    assert bf16["psnr"] == ev["psnr"]


def test_folder_source_reads_every_image_under_root_and_names_a_missing_folder(tmp_path):
    from PIL import Image

    from cqd.errors import DataError

    g = np.random.default_rng(0)
    for folder, n in (("train_hr", 2), ("bench/HR", 1)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(g.integers(0, 256, (50, 61, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    Image.fromarray(g.integers(0, 256, (40, 40), dtype=np.uint8)).save(tmp_path / "train_hr" / "gray.png")
    cfg = SRConfig(source="folder", scale=4, patch=8, train=["train_hr"], test=["bench/HR"])
    train_set, test_set = SRImages(cfg, "train", str(tmp_path)), SRImages(cfg, "test", str(tmp_path))
    assert len(train_set.hr) == 3 and train_set.names[0] == "train_hr/0.png"
    assert test_set.hr[0].shape == (3, 48, 60) and test_set.lr[0].shape == (3, 12, 15)  # modcrop to x4
    assert test_set.bicubic[0].shape == test_set.hr[0].shape
    with pytest.raises(DataError, match="no images .* under .*Set5/HR"):
        SRImages(cfg.model_copy(update={"test": ["Set5/HR"]}), "test", str(tmp_path))
    with pytest.raises(DataError, match="needs sr.root"):
        SRImages(cfg, "test")


def test_one_teacher_serves_every_test_set_column():
    from pathlib import Path

    from cqd.experiments.grid import plan

    grid = load_grid_config("configs/sr_div2k.yaml", ["base.data.root=/nowhere"])
    teachers = [c for c in plan(grid, Path("/tmp/unused")) if c.column is None]
    assert len(teachers) == 1 and teachers[0].cfg.method.name == "sr_teacher"
