"""Every shipped config validates, and every degradation it names parses and fits its images."""
from __future__ import annotations

from pathlib import Path

import pytest

from cqd.config import load_yaml, presets
from cqd.degradations import parse_degradation
from cqd.engine.schema import load_run_config
from cqd.errors import ConfigError
from cqd.experiments.schema import load_grid_config, load_tune_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid(path):
    if "columns" in load_yaml(path):
        grid = load_grid_config(path)
        for col in grid.columns.values():
            parse_degradation(col.degradation).check(1 if grid.base.data.name == "fashion_mnist" else 3,
                                                     grid.base.data.image_size)
    elif "mix" in (load_yaml(path).get("base", {}).get("data") or {}):  # `cqd sym`
        from cqd.analysis.symtable import load_sym_config

        base = load_sym_config(path).base
        for spec in base.data.mix.degradations:
            parse_degradation(spec).check(1, base.data.image_size)
    elif "search" in load_yaml(path):
        cfg = load_tune_config(path).base
        parse_degradation(cfg.data.degradation).check(1, cfg.data.image_size)
    else:
        cfg = load_run_config(path)
        parse_degradation(cfg.data.degradation).check(1, cfg.data.image_size)


def test_configs_folder_is_the_shipped_presets():
    assert [p.name for p in CONFIGS] == presets() and len(CONFIGS) >= 7


def test_presets_resolve_from_any_folder_and_a_local_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repo: no configs/ here
    assert load_grid_config("configs/quick.yaml").out_dir == "runs/quick"
    assert load_grid_config("quick").out_dir == "runs/quick"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quick.yaml").write_text("name: mine\nout_dir: mine\ncolumns: {a: {degradation: gray}}\n")
    assert load_grid_config("configs/quick.yaml").out_dir == "mine"
    for missing in ["configs/nope.yaml", "nope", "elsewhere/quick.yaml"]:
        with pytest.raises(ConfigError,
                           match=r"does not exist; the shipped presets are configs/\{cars.yaml,.*quick.yaml"):
            load_yaml(missing)
