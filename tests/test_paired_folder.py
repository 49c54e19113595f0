"""Real pairs (`data.name: paired_folder`): z is the saved low-quality twin's pixels (resized and normalized as x),
fresh, fixed and with T on top; a short CQD grid trains and tabulates on it, with a low-quality-only test set too;
a missing twin, a twin of another shape and a class in one tree only are errors naming the file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import cqd.api as api
from cqd.data import DATASETS
from cqd.degradations import parse_degradation
from cqd.engine.loaders import eval_loader
from cqd.engine.schema import run_config
from cqd.errors import ConfigError, DataError
from cqd.tasks import task_of
from helpers import tiny_cfg


def write_tree(root, n_train: int = 8, n_test: int = 4) -> None:
    """hq/<split>/<a|b>/NN.png (24x20 RGB) and their twins in lq/: class a's as JPEG re-encodings (quality 30,
    NN.jpg), class b's as 2x box-downsampled copies (12x10, NN.png)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, cls in enumerate("ab"):
            for sub in ("hq", "lq"):
                (root / sub / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = (rng.random((20, 24, 3)) * 160 + 80 * c * np.linspace(0, 1, 24)[None, :, None]).astype(np.uint8)
                im = Image.fromarray(arr)
                im.save(root / "hq" / split / cls / f"{i:02d}.png")
                if cls == "a":
                    im.save(root / "lq" / split / cls / f"{i:02d}.jpg", quality=30)
                else:
                    im.reduce(2).save(root / "lq" / split / cls / f"{i:02d}.png")


def paired_cfg(root, **data) -> dict:
    return tiny_cfg(root, "run", data={"name": "paired_folder", "root": str(root / "hq"), "root_lq": str(root / "lq"),
                                       "image_size": 16, "degradation": "none", **data},
                    train={"epochs": 1, "batch_size": 4, "lr": 0.05, "progress": False, "max_steps_per_epoch": 2,
                           "precision": "32-true"})


def lq_pixels(path, size: int) -> torch.Tensor:
    """The saved twin as x is made: decoded as RGB, resized (antialiased bilinear), in [0, 1]."""
    img = TF.pil_to_tensor(Image.open(path).convert("RGB"))
    return TF.resize(img, [size, size], antialias=True).float() / 255


@pytest.mark.parametrize("spec, fresh, fixed", [("none", False, False), ("none", False, True),
                                                ("noise:std=0.1", False, True), ("noise:std=0.1", True, False)])
def test_z_is_the_saved_twin_resized_and_normalized_as_x(tmp_path, spec, fresh, fixed):
    write_tree(tmp_path)
    cfg = run_config(paired_cfg(tmp_path, degradation=spec, fresh_each_epoch=fresh))
    task = task_of(cfg)
    train_ds, _, base, _ = task.build_datasets(cfg)
    maker = task.make_maker(cfg, base)
    loader = eval_loader(cfg, train_ds, base)
    if fixed:  # the twins table the engine makes once before training (setup._fix_twins)
        assert maker.fix_twins(loader, "cpu", len(base)) == len(base)
    T, epoch, seen = parse_degradation(spec), 3, 0
    for batch in loader:
        pair = maker(batch, "cpu", epoch)
        idx = pair.index
        lq = torch.stack([lq_pixels(base.twins[i], 16) for i in idx.tolist()])
        want = maker.normalize(T(lq, idx, cfg.data.seed + 1, epoch if fresh else None)[0])
        torch.testing.assert_close(pair.z, want, atol=1e-6, rtol=0)
        hq = torch.stack([lq_pixels(base.records[i].path, 16) for i in idx.tolist()])
        torch.testing.assert_close(pair.x, maker.normalize(hq), atol=1e-6, rtol=0)
        assert not torch.allclose(pair.x, pair.z)  # z is not x: it comes from the twin
        seen += len(idx)
    assert seen == len(base) == 16


def test_a_short_cqd_grid_trains_and_tabulates_with_a_low_quality_test_set(tmp_path):
    write_tree(tmp_path)
    shutil.copytree(tmp_path / "lq" / "train", tmp_path / "real" / "train")
    (tmp_path / "real" / "test" / "a").mkdir(parents=True)  # real low-quality test images, no twins
    for i in range(5):
        Image.fromarray(np.full((9, 11, 3), 40 * i, np.uint8)).save(tmp_path / "real" / "test" / "a" / f"x{i}.jpg")
    grid = {"name": "real", "out_dir": str(tmp_path / "grid"), "seeds": [0], "rows": ["hq", "lq", "cqd"],
            "columns": {"pairs": {"degradation": "none"},
                        "lq_only": {"degradation": "none", "set": {"data.root_lq": str(tmp_path / "real"),
                                                                   "data.test_lq_only": True}}},
            "base": paired_cfg(tmp_path)}
    out = api.table(grid)
    assert "CQD" in out["markdown"] and (tmp_path / "grid" / "report" / "table.md").is_file()
    cells = tmp_path / "grid" / "cells"
    res = api.evaluate(cells / "pairs" / "cqd" / "s0" / "model.pt", grid["base"],
                       f"data.root_lq={tmp_path / 'real'}", "data.test_lq_only=true")
    assert "acc_hq" not in res and res["n_test"] == 5 and res["acc_lq"] is not None
    only = json.loads((cells / "lq_only" / "cqd" / "s0" / "result.json").read_text())
    assert only["acc_hq"] is None and only["acc_lq"] is not None  # trained on pairs, tested on real z alone


def _break(root, how: str) -> str:
    if how == "missing twin":
        (root / "lq" / "train" / "a" / "03.jpg").unlink()
        return "hq/train/a/03.png has no low-quality twin"
    if how == "size mismatch":
        Image.new("RGB", (10, 10)).save(root / "lq" / "train" / "b" / "01.png")
        return "lq/train/b/01.png is 10x10 px, not the shape of its high-quality twin"
    (root / "lq" / "train" / "c").mkdir()
    Image.new("RGB", (12, 10)).save(root / "lq" / "train" / "c" / "00.png")
    return "class folder\\(s\\) c of .*lq/train are missing from .*hq/train"


@pytest.mark.parametrize("how", ["missing twin", "size mismatch", "class in one tree"])
def test_broken_pairs_are_errors_naming_the_file(tmp_path, how):
    write_tree(tmp_path, n_train=4, n_test=1)
    match = _break(tmp_path, how)
    with pytest.raises(DataError, match=match):
        DATASETS.get("paired_folder")(str(tmp_path / "hq"), "train", 16, root_lq=str(tmp_path / "lq"))


def test_the_config_asks_for_both_trees():
    with pytest.raises(ConfigError, match="paired_folder needs data.root_lq"):
        run_config({"data": {"name": "paired_folder", "root": "x", "degradation": "none"}})
    with pytest.raises(ConfigError, match="data.root_lq is for data.name: paired_folder"):
        run_config({"data": {"root_lq": "x"}})
