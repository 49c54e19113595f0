"""Code from outside the package plugs in as the package's own does: a task (with its config section, data,
metric and report) and its methods, registered by a module named in `plugins:` (tests/plugin_regress.py),
train, evaluate and tabulate through the CLI; a method registered later gets its config section."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cqd.cli import main
from cqd.engine.schema import run_config
from cqd.errors import ConfigError

TINY = {"model": "resnet8", "data": {"image_size": 16, "degradation": "none"},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "precision": "32-true", "progress": False,
                  "accelerator": "cpu"}}


@pytest.fixture(autouse=True)
def clean_registries():
    """What a test's plugin registers is gone after it (later tests list the registries' names)."""
    from cqd import plugins
    from cqd.methods import METHODS
    from cqd.tasks import TASKS

    saved = dict(METHODS._items), dict(TASKS._items), set(plugins._LOADED)
    yield
    for registry, items in zip((METHODS, TASKS), saved):
        registry._items.clear()
        registry._items.update(items)
    plugins._LOADED.clear()
    plugins._LOADED.update(saved[2])
    sys.modules.pop("plugin_regress", None)


def _run(root: Path, **over) -> dict:
    return {"plugins": ["plugin_regress"], "task": "regress", "name": "r", "out_dir": str(root / "run"),
            "cache_dir": str(root / "cache"), "method": {"name": "regress"}, "regress": {"items": 64}, **TINY, **over}


def _yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_plugin_task_trains_evaluates_and_tabulates_through_the_cli(tmp_path, capsys):
    cfg = _yaml(tmp_path / "run.yaml", _run(tmp_path))
    assert main(["train", "--config", cfg]) == 0
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert set(res["history"][-1]) >= {"loss_mse", "mae_hq", "mae_lq"} and res["mae_lq"] > 0

    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run" / "model.pt"), "--config", cfg]) == 0
    shown = json.loads(capsys.readouterr().out)

    # the same MAE computed here from the saved weights, the plugin's data and the noise formula
    import plugin_regress as p
    from cqd.engine.model_files import load_model

    model, _ = load_model(tmp_path / "run" / "model.pt")
    test = p.Smooth(32, 16, seed=2)
    x = test.images
    noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(32)])
    with torch.no_grad():
        pred = model.eval()(x + 0.3 * noise).float().squeeze(1)
    assert shown["mae_lq"] == pytest.approx((pred - x.mean((1, 2, 3))).abs().mean().item(), rel=1e-5)

    grid = {"name": "regress grid", "out_dir": str(tmp_path / "grid"), "seeds": [0], "rows": ["regress"],
            "columns": {"calm": {"set": {"regress.noise": 0.1}}, "loud": {"set": {"regress.noise": 0.6}}},
            "base": {k: v for k, v in _run(tmp_path).items() if k not in ("out_dir", "name")}}
    assert main(["table", "--config", _yaml(tmp_path / "grid.yaml", grid)]) == 0
    table = (tmp_path / "grid" / "report" / "table.md").read_text()
    assert table.splitlines()[0] == "| row | calm | loud |" and table.splitlines()[2].startswith("| regress | ")
    cells = {c: json.loads((tmp_path / "grid" / "cells" / c / "regress" / "s0" / "result.json").read_text())
             for c in ("calm", "loud")}
    assert [cells[c]["config"]["regress"]["noise"] for c in ("calm", "loud")] == [0.1, 0.6]


def test_a_task_section_is_validated_only_for_its_task(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        run_config(_run(tmp_path, regress={"itemz": 3}))
    with pytest.raises(ConfigError, match="`regress:` is the section of task 'regress'"):
        run_config({"plugins": ["plugin_regress"], "regress": {"items": 8}})
    assert "sr" not in run_config({}).model_dump()  # a classification run holds no sr section


def test_a_method_registered_later_gets_its_section():
    from cqd.methods import METHODS, Method
    from cqd.schema import Strict

    class Params(Strict):
        weight: float = 1.0

    @METHODS.register("late_method_for_test")
    class Late(Method):
        pass

    Late.Params = Params
    try:
        cfg = run_config({"method": {"name": "late_method_for_test", "late_method_for_test": {"weight": 3.0}}})
        assert cfg.method.params.weight == 3.0
        with pytest.raises(ConfigError, match="late_method_for_test.wait: unknown key"):
            run_config({"method": {"name": "late_method_for_test", "late_method_for_test": {"wait": 3.0}}})
    finally:
        METHODS._items.pop("late_method_for_test")


def test_an_unknown_plugin_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no module named 'no_such_plugin_module'"):
        run_config({"plugins": ["no_such_plugin_module"]})
    assert main(["train", "--config", _yaml(tmp_path / "bad.yaml", {"plugins": ["no_such_plugin_module"]})]) == 2


def test_the_config_module_imports_no_registry():
    code = "import sys, cqd.config; print(sorted(m for m in sys.modules if m.startswith('cqd')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["cqd", "cqd.config", "cqd.errors"]
