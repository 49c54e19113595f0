"""The regimes study's report on a tiny grid: heat-map data of the right shape, and per-seed differences that match
the cells' result files read here directly."""
from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from cqd.analysis.regimes import main, parse_row, write
from cqd.api import table
from cqd.experiments.schema import load_grid_config
from cqd.files import load_json


def _grid(tmp_path: Path) -> dict:
    run = {"max_steps_per_epoch": 2, "batch_size": 16, "precision": "32-true", "progress": False}
    return {
        "name": "tiny regimes", "out_dir": str(tmp_path / "g"), "seeds": [0, 1],
        "rows": [{"id": "B", "set": {"method.name": "lq"}}, {"id": "staged", "set": {"method.name": "staged"}},
                 {"id": "cqd", "set": {"method.name": "cqd"}},
                 {"id": "cqd_priv", "set": {"method.name": "cqd", "teacher.train_subset": 128}}],
        "columns": {"n64": {"degradation": "lowres:size=4", "set": {"data.train_subset": 64}},
                    "n96": {"degradation": "lowres:size=4", "set": {"data.train_subset": 96}}},
        "base": {"model": "resnet8", "data": {"image_size": 16, "test_subset": 48, "val_fraction": 0.25},
                 "train": {**run, "epochs": 1}},
    }


def _acc(root: Path, column: str, row: str, seed: int) -> float:
    return load_json(root / "cells" / column / row / f"s{seed}" / "result.json")["acc_lq"]


def test_row_ids_name_roles_kinds_and_degradations():
    assert parse_row("cqd_cal_priv") == ("", "cqd_cal", "privileged")
    assert parse_row("clutter.staged") == ("clutter", "staged", "own")
    assert parse_row("B_priv") is None and parse_row("hq") is None


def test_the_report_of_a_tiny_study(tmp_path):
    cfg = _grid(tmp_path)
    grid = load_grid_config(cfg)
    assert main([str(tmp_path / "none.yaml")]) == 2
    with pytest.raises(Exception, match="no result yet"):
        write(grid)
    table(cfg)
    maps = write(grid)
    root = Path(cfg["out_dir"])
    assert (root / "regimes.png").stat().st_size > 0 and "CQD - staged" in (root / "regimes.md").read_text()
    diffs = maps["differences"]["lowres:size=4"]
    # staged has no privileged twin here, so cqd-staged is the own teacher's only; cqd-B has both teachers
    assert set(diffs) == {"cqd-staged", "cqd-B"}
    assert set(diffs["cqd-staged"]) == {"own"} and set(diffs["cqd-B"]) == {"own", "privileged"}
    for comp, kinds in diffs.items():
        for kind, cols in kinds.items():
            assert list(cols) == ["n64", "n96"]
            a, b = comp.split("-")
            a = a + ("_priv" if kind == "privileged" else "")
            for column, st in cols.items():
                want = [100 * (_acc(root, column, a, s) - _acc(root, column, b, s)) for s in (0, 1)]
                assert st["per_seed"] == pytest.approx(want)
                assert st["mean"] == pytest.approx(statistics.fmean(want))
                assert st["std"] == pytest.approx(statistics.stdev(want))
                assert st["sure"] == ((min(want) > 0 or max(want) < 0) and abs(st["mean"]) > st["std"])
    teachers = maps["teachers"]["lowres:size=4"]
    assert set(teachers) == {"own", "privileged"} and set(teachers["own"]["n64"]) == {0, 1}


def test_the_shipped_study_gives_every_column_about_500_steps():
    grid = load_grid_config("configs/regimes.yaml")
    for column in grid.columns:
        cfg = grid.cell(column, grid.rows[0], 0)
        n = cfg.data.train_subset - round(cfg.data.train_subset * cfg.data.val_fraction)
        steps = n // cfg.train.batch_size * cfg.train.epochs  # the loader drops the last partial batch
        assert abs(steps - 500) <= 5, (column, steps)
