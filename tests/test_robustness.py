"""`cqd robustness` and a grid's `robustness:`: the sweep's top-1 is `cqd eval`'s at each spec, mCE is ImageNet-C's
(computed here by hand from the CSV), the figure draws one line per model in every panel, and a spec that does
not fit the images is an error before anything runs (a severity of the default families is skipped with a note)."""
from __future__ import annotations

import csv
import statistics

import pytest
import yaml

import cqd.api as api
from cqd import cli
from cqd.errors import ConfigError
from helpers import tiny_cfg

SWEEP = {"lowres": [24, 8, 4], "blur": [1, 2], "noise": [0.2, 0.4], "jpeg": [20]}  # 24 does not fit 16-px images


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A one-column grid of two rows (no teacher to train) that asks for the sweep of both rows' models."""
    root = tmp_path_factory.mktemp("robust")
    base = tiny_cfg(root, "base", data={"train_subset": 64, "test_subset": 96, "image_size": 16,
                                        "degradation": "blur:sigma=1.5"}, robustness=SWEEP)
    grid = {"name": "robust", "out_dir": str(root / "grid"), "seeds": [0], "rows": ["lq", "augment"],
            "columns": {"blur": {"degradation": "blur:sigma=1.5"}}, "base": base,
            "robustness": {"column": "blur", "rows": ["lq", "augment"]}}
    out = api.table(grid)
    return root, base, out


def _csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_grid_sweep_equals_eval_at_each_spec_and_mce_is_imagenet_cs(grid):
    root, base, out = grid
    folder = root / "grid" / "report" / "robustness"
    rows = _csv(folder / "robustness.csv")
    specs = ["none", "lowres:size=8", "lowres:size=4", "blur:sigma=1", "blur:sigma=2", "noise:std=0.2", "noise:std=0.4",
             "jpeg:quality=20", "blur:sigma=1.5"]  # clean, the families (24 skipped), then the run's own T
    assert list(dict.fromkeys(r["spec"] for r in rows)) == specs
    assert {r["label"] for r in rows} == {"lq", "augment"}
    for r in rows:  # the same top-1 as `cqd eval` with data.degradation=<spec>, run on its own
        assert float(r["top1"]) == api.evaluate(r["model"], base, f"data.degradation={r['spec']}")["acc_lq"], r
    assert any(float(r["top1"]) != api.evaluate(r["model"], base, f"data.degradation={r['spec']}", "data.seed=1")
               ["acc_lq"] for r in rows if r["family"] == "noise")  # other draws give other numbers: a real check
    err = {(r["label"], r["family"]): [] for r in rows}
    for r in rows:
        err[(r["label"], r["family"])].append(float(r["error"]))
    families = ["lowres", "blur", "noise", "jpeg", "T"]
    res = {m["label"]: m for m in yaml.safe_load((folder / "robustness.json").read_text())["models"]}
    assert res["lq"]["mCE"] == 1.0 and all(v == 1.0 for v in res["lq"]["ce"].values())  # the baseline: the first row
    by_hand = statistics.fmean(sum(err[("augment", f)]) / sum(err[("lq", f)]) for f in families)
    assert res["augment"]["mCE"] == pytest.approx(by_hand, rel=1e-12)
    assert res["augment"]["mean_top1"] == pytest.approx(
        statistics.fmean(1 - e for f in families for e in err[("augment", f)]), rel=1e-12)
    data = yaml.safe_load((folder / "robustness.json").read_text())
    assert (folder / "robustness.png").stat().st_size > 0
    assert data["figure"]["lines"] == {f: ["lq", "augment"] for f in families}  # one line per model in each panel
    assert any("lowres:size=24" in n for n in data["notes"])
    table = (root / "grid" / "report" / "table.md").read_text()
    assert "## Robustness (column blur, seed 0)" in table and "| augment |" in out["markdown"]


def test_the_command_labels_models_by_method_and_takes_specs_and_a_baseline(grid, capsys):
    root, base, _ = grid
    cells = root / "grid" / "cells" / "blur"
    (root / "run.yaml").write_text(yaml.safe_dump(base))
    lq, aug = str(cells / "lq" / "s0" / "model.pt"), str(cells / "augment" / "s0" / "model.pt")
    argv = ["robustness", "--config", str(root / "run.yaml"), "--specs", "lowres:size=6", "noise:std=0.2",
            "--baseline", aug, "--out", str(root / "cli"), "--models", lq, aug, "robustness.own=false"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    rows = _csv(root / "cli" / "robustness.csv")
    assert [r["spec"] for r in rows if r["label"] == "lq"] == ["none", "lowres:size=6", "noise:std=0.2"]
    assert {r["label"]: r["method"] for r in rows} == {"lq": "lq", "augment": "augment"}
    models = {m["label"]: m for m in yaml.safe_load((root / "cli" / "robustness.json").read_text())["models"]}
    assert models["augment"]["mCE"] == 1.0  # --baseline


def test_a_spec_that_does_not_fit_the_images_is_an_error_before_anything_runs(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, "r")
    with pytest.raises(ConfigError, match="lowres:size=24.*image_size=16"):
        api.robustness([tmp_path / "missing.pt"], cfg, specs=["lowres:size=24"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    rc = cli.main(["robustness", "--models", "missing.pt", "--config", str(tmp_path / "r.yaml"),
                   "robustness.more={'tps:sigmaa': [8]}"])
    assert rc == 2 and "sigmaa" in capsys.readouterr().err  # a bad family is a config error naming it
    with pytest.raises(ConfigError, match="robustness.column 'nope'"):
        from cqd.experiments.schema import grid_config

        grid_config({"columns": {"a": {"degradation": "lowres:size=4"}}, "base": cfg,
                     "robustness": {"column": "nope", "rows": ["lq"]}})
