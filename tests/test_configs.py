"""Every shipped config validates, and every degradation it names parses and fits its images."""
from __future__ import annotations

from pathlib import Path

import pytest

from cqd.config import load_grid_config, load_run_config, load_yaml
from cqd.degradations import parse_degradation

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid(path):
    if "columns" in load_yaml(path):
        grid = load_grid_config(path)
        for col in grid.columns.values():
            parse_degradation(col.degradation).check(1 if grid.base.data.name == "fashion_mnist" else 3, grid.base.data.image_size)
    else:
        cfg = load_run_config(path)
        parse_degradation(cfg.data.degradation).check(1, cfg.data.image_size)
