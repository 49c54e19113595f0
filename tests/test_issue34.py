"""Issue 34, "nothing lost, nothing stale, no internal errors": the cases a careful user and an adversary found.

Work lost (a finished run or the exported model overwritten), wrong results given silently (a grid's or
sym table's cells reused under other settings, a repeated seed, a teacher of another architecture, an export
checked on another task's data), internal errors for bad input, and messages in cqd's own words. Each case
runs through `cqd.cli.main` in this process (or the API where the CLI adds nothing); the training is shared
by two module fixtures (one finished run, one finished grid).
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from cqd import api
from cqd.cli import main
from cqd.engine.model_files import save_model
from cqd.engine.schema import run_config
from cqd.errors import CheckpointError, ConfigError, CQDError
from cqd.models import create_model
from helpers import tiny_cfg

# --- helpers ------------------------------------------------------------------------------------


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    got = capsys.readouterr()
    return rc, got.out, got.err


def refused(capsys, *args, names=()) -> str:
    """The CLI exits 2 with one `cqd: error:` paragraph (no traceback, no internal error) naming `names`."""
    rc, _, err = cli(capsys, *args)
    assert rc == 2, err
    assert err.count("cqd: error:") == 1 and "Traceback" not in err and "internal error" not in err, err
    msg = err[err.index("cqd: error:"):]
    assert "\n\n" not in msg.strip() and "\x1b[" not in msg, msg
    for name in names:
        assert str(name) in msg, f"{name!r} not in {msg!r}"
    return msg


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def saved_model(root: Path, name: str, model: str = "resnet8", classes: int = 10, chans: int = 1, **over) -> Path:
    """A model.pt as `cqd train` writes it (random weights: no training), with a tiny classification config."""
    cfg = run_config(tiny_cfg(root, name, model=model, **over))
    torch.manual_seed(0)
    path = Path(cfg.out_dir) / "model.pt"
    save_model(create_model(model, classes, chans).eval(), cfg, classes, chans, path)
    return path


def sr_model(root: Path) -> Path:
    """An SR model.pt (EDSR x2, 3 output channels) of task sr, untrained."""
    cfg = run_config({"task": "sr", "model": "edsr:blocks=1,feats=4", "out_dir": str(root / "sr"),
                      "sr": {"scale": 2, "train": ["text"], "test": ["page"]}})
    torch.manual_seed(0)
    path = root / "sr" / "model.pt"
    save_model(create_model("edsr:blocks=1,feats=4,scale=2", 3, 3).eval(), cfg, 3, 3, path)
    return path


def mtimes(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.name in ("result.json", "model.pt")}


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory) -> tuple[dict, Path]:
    """A finished tiny grid (one column, rows lq and cqd, one shared teacher): (grid dict, its out_dir)."""
    root = tmp_path_factory.mktemp("grid34")
    base = tiny_cfg(root, "base")
    del base["name"], base["out_dir"]
    grid = {"name": "g34", "out_dir": str(root / "grid"), "seeds": [0], "rows": ["lq", "cqd"],
            "columns": {"lowres": {"degradation": "lowres:size=4"}}, "base": base}
    api.table(grid)
    return grid, root / "grid"


@pytest.fixture
def grid_copy(grid_dir, tmp_path) -> tuple[Path, Path]:
    """The finished grid copied to tmp_path/grid (cache beside it): (its config file, its out_dir)."""
    grid, out = grid_dir
    shutil.copytree(out, tmp_path / "grid")
    data = json.loads(json.dumps(grid))
    data["out_dir"] = str(tmp_path / "grid")
    data["base"]["cache_dir"] = str(tmp_path / "cache")
    return write_yaml(tmp_path / "grid.yaml", data), tmp_path / "grid"


# --- work lost -----------------------------------------------------------------------------------


def test_1_train_into_a_finished_out_dir_needs_resume_or_force(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "run.yaml", tiny_cfg(tmp_path, "run", method__name="lq"))
    rc, _, err = cli(capsys, "train", "--config", cfg, "--resume")  # 8: --resume with nothing to resume says so
    assert rc == 0, err
    assert f"no last.ckpt in {tmp_path / 'run'}: starting from the beginning" in err
    before = mtimes(tmp_path / "run")
    assert len(before) == 2
    msg = refused(capsys, "train", "--config", cfg, names=(tmp_path / "run", "--resume", "--force", "out_dir"))
    assert "finished run" in msg
    assert mtimes(tmp_path / "run") == before  # nothing replaced
    with pytest.raises(ConfigError, match="--force"):
        api.train(str(cfg))
    rc, out, err = cli(capsys, "train", "--config", cfg, "--force")
    assert rc == 0, err
    assert f"replacing the finished run in {tmp_path / 'run'}" in out + err
    after = mtimes(tmp_path / "run")
    assert all(after[p] > before[p] for p in before)


def test_2_export_writes_over_neither_its_input_nor_an_existing_file_without_force(tmp_path, capsys):
    model = saved_model(tmp_path, "m")
    data = model.read_bytes()
    for fmt in ("torchscript", "onnx"):
        refused(capsys, "export", "--model", model, "--format", fmt, "--out", model, "--no-check",
                names=(model, "model being exported"))
        refused(capsys, "export", "--model", model, "--format", fmt, "--out", model, "--force", "--no-check",
                names=(model,))
    assert model.read_bytes() == data
    target = tmp_path / "g.ts"
    target.write_text("mine")
    refused(capsys, "export", "--model", model, "--format", "torchscript", "--out", target, "--no-check",
            names=(target, "--force"))
    assert target.read_text() == "mine"
    with pytest.raises(CQDError, match="force=True"):
        api.export(model, "torchscript", out=target, check=False)
    rc, _, err = cli(capsys, "export", "--model", model, "--format", "torchscript", "--out", target, "--force")
    assert rc == 0, err
    assert target.stat().st_size > 100 and model.read_bytes() == data


# --- wrong results, silently -----------------------------------------------------------------------


def test_3_a_grid_reuses_cells_only_under_the_same_settings(grid_copy, capsys):
    cfg, out = grid_copy
    # moved to another folder (and a classification result.json written before each task owned its section,
    # with an `sr:` section): the same settings, every cell reused and said so
    cell = out / "cells" / "lowres" / "cqd" / "s0" / "result.json"
    res = json.loads(cell.read_text())
    res["config"]["sr"] = {"scale": 4, "patch": 24}
    cell.write_text(json.dumps(res))
    before = mtimes(out)
    assert len(before) == 6  # the teacher, lq and cqd: model.pt and result.json each
    rc, stdout, err = cli(capsys, "table", "--config", cfg)
    assert rc == 0, err
    assert "reused 3 finished cell(s)" in stdout and "lowres/cqd/s0" in stdout and "teacher/" in stdout
    assert mtimes(out) == before
    # a changed base or column: stop before training anything, naming the cells and the keys (old -> new)
    msg = refused(capsys, "table", "--config", cfg, "base.train.lr=0.5",
                  names=("lowres/lq/s0", "lowres/cqd/s0", "train.lr", "0.05 -> 0.5", "--force"))
    assert "teacher/" in msg
    msg = refused(capsys, "table", "--config", cfg, "columns.lowres.degradation=blur:sigma=3",
                  names=("lowres/lq/s0", "lowres/cqd/s0", "data.degradation", "'lowres:size=4' -> 'blur:sigma=3'"))
    assert "teacher/" not in msg  # f never sees the column's degradation: it is still reused
    assert mtimes(out) == before
    # --force retrains them, saying so
    rc, stdout, err = cli(capsys, "table", "--config", cfg, "columns.lowres.degradation=blur:sigma=3", "--force")
    assert rc == 0, err
    assert "--force: retraining 2 cell(s) trained under other settings" in stdout
    after = mtimes(out)
    assert all(after[p] > before[p] for p in before)
    assert json.loads((out / "cells" / "lowres" / "lq" / "s0" / "result.json").read_text())["degradation"] == \
        "blur:sigma=3"


def test_3_the_rule_is_one_function_that_other_executors_share(grid_copy):
    from cqd.experiments.grid import CellMismatch, finished, plan
    from cqd.experiments.schema import load_grid_config

    cfg, out = grid_copy
    grid = load_grid_config(cfg, ["base.train.epochs=2"])
    cells = plan(grid, out)
    with pytest.raises(CellMismatch) as e:
        finished(cells[-1].cfg)
    assert "train.epochs" in str(e.value) and e.value.cells[0][0] == "lowres/cqd/s0"
    same = load_grid_config(cfg)
    assert finished(plan(same, out)[-1].cfg)["name"] == "lowres/cqd/s0"


def test_3_sym_cells_carry_their_mix(tmp_path, capsys):
    """`cqd sym` after changing data.mix.degradations: its finished cells (here written by hand) mismatch."""
    from cqd.analysis.symtable import grid_of, load_sym_config
    from cqd.experiments.grid import plan

    base = tiny_cfg(tmp_path, "x", data__mix={"degradations": ["lowres:size=4", "blur:sigma=1"]})
    del base["name"], base["out_dir"]
    path = write_yaml(tmp_path / "sym.yaml", {"out_dir": str(tmp_path / "sym"), "seeds": [0], "base": base})
    for cell in plan(grid_of(load_sym_config(path)), tmp_path / "sym"):
        Path(cell.cfg.out_dir).mkdir(parents=True)
        (Path(cell.cfg.out_dir) / "result.json").write_text(json.dumps({"config": cell.cfg.model_dump()}))
    refused(capsys, "sym", "--config", path, "base.data.mix.degradations=[lowres:size=4,noise:std=0.2]",
            names=("mix/sym/s0", "mix/quality/s0", "data.mix.degradations", "--force"))


def test_4_a_repeated_seed_is_an_error(tmp_path, capsys):
    grid = {"out_dir": str(tmp_path / "g"), "seeds": [0, 1, 0], "columns": {"lowres": {"degradation": "lowres"}},
            "base": tiny_cfg(tmp_path, "b")}
    refused(capsys, "table", "--config", write_yaml(tmp_path / "g.yaml", grid), names=("seeds", "0", "twice"))
    base = tiny_cfg(tmp_path, "x", data__mix={"degradations": ["lowres:size=4", "blur:sigma=1"]})
    sym = write_yaml(tmp_path / "sym.yaml", {"out_dir": str(tmp_path / "sym"), "seeds": [3, 3], "base": base})
    refused(capsys, "sym", "--config", sym, names=("seeds", "3", "twice"))


def test_5_an_explicit_teacher_model_must_be_the_checkpoints(tmp_path, capsys):
    teacher = saved_model(tmp_path, "wrn", model="wrn_16_2")
    cfg = write_yaml(tmp_path / "run.yaml", tiny_cfg(tmp_path, "run"))
    refused(capsys, "train", "--config", cfg, "teacher.model=resnet8", f"teacher.checkpoint={teacher}",
            names=(teacher, "'wrn_16_2'", "teacher.model", "'resnet8'"))
    assert not (tmp_path / "run" / "model.pt").exists()


def test_6_9_export_checks_the_models_task_and_channels_against_the_configs(tmp_path, capsys):
    sr = sr_model(tmp_path)
    cls = saved_model(tmp_path, "cls")
    cls_cfg = write_yaml(tmp_path / "cls.yaml", tiny_cfg(tmp_path, "cls"))
    for fmt in ("torchscript", "onnx"):
        refused(capsys, "export", "--model", sr, "--format", fmt, "--config", cls_cfg, "--out", tmp_path / f"a.{fmt}",
                names=(sr, "task 'sr'", "task 'classification'"))
        msg = refused(capsys, "export", "--model", cls, "--format", fmt, "--config", "sr_x4",
                      "--out", tmp_path / f"b.{fmt}", names=(cls, "task 'classification'", "task 'sr'"))
        assert "E1" not in msg and "torch.export" not in msg
    assert not list(tmp_path.glob("[ab].*"))
    # the same task, other channels: a 3-channel classifier checked on 1-channel Fashion-MNIST
    rgb = saved_model(tmp_path, "rgb", chans=3)
    refused(capsys, "export", "--model", rgb, "--format", "torchscript", "--config", cls_cfg,
            "--out", tmp_path / "c.ts", names=(rgb, "3-channel", "1 channel"))


def test_7_eval_refuses_a_nan_mix(tmp_path, capsys):
    """Fails on the mix check as it was (`min(c) < 0 or abs(sum(c) - 1) > 1e-4`, which NaN passes)."""
    from cqd.models.sym import SymNet
    from cqd.tasks.sr import SuperResolution

    net = SymNet(create_model("edsr:blocks=1,feats=4,scale=2", 3, 3), 3, {"body.0": [4, 1]})
    for c in ([float("nan"), 0.5, 0.5], [0.5, 0.5, float("nan")], [float("inf"), 0, 0]):
        with pytest.raises(ConfigError, match="each >= 0, summing to 1"):
            SuperResolution().at_mix(net, {}, c, "m.pt")
    assert SuperResolution().at_mix(net, {}, [0.2, 0.3, 0.5], "m.pt")[1] == [0.2, 0.3, 0.5]


def test_8_config_mistakes_that_were_silent(tmp_path, capsys):
    base = tiny_cfg(tmp_path, "b")
    grid = {"out_dir": str(tmp_path / "g"), "columns": {"lowres": {"degradation": "lowres"}}, "base": base}
    refused(capsys, "table", "--config", write_yaml(tmp_path / "g1.yaml", {**grid, "columns": {}}),
            names=("columns", "empty"))
    assert not (tmp_path / "g").exists()
    for where, over in (("row 'lq'", {"rows": [{"id": "lq", "set": {"method.name": "lq", "out_dir": "x"}}]}),
                        ("column 'lowres'", {"columns": {"lowres": {"set": {"seed": 3}}}}),
                        ("row 'cqd'", {"rows": [{"id": "cqd", "set": {"method.name": "cqd", "cache_dir": "c"}}]})):
        refused(capsys, "table", "--config", write_yaml(tmp_path / "g2.yaml", {**grid, **over}), names=(where,))
    mix = tiny_cfg(tmp_path, "x", data__mix={"degradations": ["blur:sigma=1", "lowres:size=4", "blur:sigma=1.0"]})
    sym = write_yaml(tmp_path / "sym.yaml", {"out_dir": str(tmp_path / "sym"), "base": mix})
    refused(capsys, "sym", "--config", sym, names=("blur:sigma=1", "twice"))
    run = write_yaml(tmp_path / "run.yaml", tiny_cfg(tmp_path, "run"))
    for method in ("feed", "ens"):
        refused(capsys, "train", "--config", run, f"method.name={method}", "teachers=[]",
                names=("teachers", method))
    assert not (tmp_path / "run").exists()


def test_8_a_train_subset_above_the_split_is_a_notice_printed_once(tmp_path, capsys):
    from cqd.tasks.classification.data import build_datasets

    cfg = write_yaml(tmp_path / "run.yaml", tiny_cfg(tmp_path, "run", method__name="lq", data__degradation="none",
                                                     data__train_subset=99999999, train__max_steps_per_epoch=1))
    rc, _, err = cli(capsys, "train", "--config", cfg)
    assert rc == 0, err
    assert err.count("cqd: warning:") == 1, err
    assert "data.train_subset=99999999" in err and "all 60000" in err
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_datasets(run_config(tiny_cfg(tmp_path, "t", data__test_subset=12345678)))
    assert [str(w.message) for w in seen if "12345678" in str(w.message) and "all 10000" in str(w.message)]


# --- internal errors for bad input ------------------------------------------------------------------


def test_9_an_onnx_export_failure_names_its_cause_without_colour_codes(tmp_path, monkeypatch, caplog):
    import logging

    import cqd.export as ex

    model = saved_model(tmp_path, "m")

    def fail(*a, **k):
        logging.getLogger("torch.export._trace").error("always_classified is unsupported.")  # torch's log line
        try:
            raise RuntimeError("expected input[s77, 3, 24, 24] to have 1 channels, but got 3 channels instead")
        except RuntimeError as cause:
            raise ValueError("Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m of "
                             "exporting the model to ONNX. Next steps:\n- Modify the model code") from cause

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(CQDError) as e:
        ex.export_model(model, "onnx", tmp_path / "m.onnx", check=False)
    msg = str(e.value)
    assert "\x1b" not in msg and "[96m" not in msg and "but got 3 channels instead" in msg, msg
    assert "step 1/3" in msg and ".tmp" not in msg
    assert not [r for r in caplog.records if "always_classified" in r.getMessage()]  # the exporter's log is quiet


def test_10_16_export_to_an_unwritable_path_names_it(tmp_path, capsys):
    model = saved_model(tmp_path, "m")
    for fmt in ("torchscript", "pt2", "onnx"):
        for out in ("/proc/cqd/m", "/proc/self/m"):
            msg = refused(capsys, "export", "--model", model, "--format", fmt, "--out", out, "--no-check",
                          names=(out,))
            assert ".tmp" not in msg


def test_11_eval_of_a_mix_conditioned_model_without_a_mix_says_to_set_it(tmp_path, capsys):
    from cqd.models.sym import sym_net

    cfg = run_config(tiny_cfg(tmp_path, "sym", method__name="symcqd",
                              data__mix={"degradations": ["lowres:size=4", "blur:sigma=1"]}))
    torch.manual_seed(0)
    net = sym_net(create_model("resnet8", 10, 1), 2, None, torch.zeros(2, 1, 16, 16)).eval()
    path = tmp_path / "sym" / "model.pt"
    save_model(net, cfg, 10, 1, path)
    plain = write_yaml(tmp_path / "plain.yaml", tiny_cfg(tmp_path, "plain"))
    refused(capsys, "eval", "--model", path, "--config", plain, names=(path, "data.mix", "symcqd"))


@pytest.mark.parametrize("storage, what", [("foo://x", "foo"), ("sqlite:////proc/cqd/study.db", "/proc/cqd"),
                                           ("sqlite:///", "in memory"), ("sqlite://", "in memory"),
                                           ("sqlite:///:memory:", "in memory"), ("postgresql//x", "postgresql//x")])
def test_12_tune_storage_is_checked_before_anything_runs(storage, what, tmp_path, capsys):
    base = tiny_cfg(tmp_path, "base", data__val_fraction=0.25)
    tc = {"name": "study", "out_dir": str(tmp_path / "tune"), "base": base, "n_trials": 1, "storage": storage,
          "search": {"train.lr": {"low": 0.01, "high": 0.1, "log": True}}}
    refused(capsys, "tune", "--config", write_yaml(tmp_path / "tune.yaml", tc), names=("storage", what))
    assert not (tmp_path / "tune" / "teacher").exists()


def test_13_an_empty_rows_list_is_an_error(tmp_path, capsys):
    grid = {"out_dir": str(tmp_path / "g"), "rows": [], "columns": {"lowres": {"degradation": "lowres"}},
            "base": tiny_cfg(tmp_path, "b")}
    refused(capsys, "table", "--config", write_yaml(tmp_path / "g.yaml", grid), names=("rows", "empty"))


def test_14_a_truncated_cell_result_is_named_and_that_cell_redone(grid_copy, capsys):
    cfg, out = grid_copy
    cell = out / "cells" / "lowres" / "lq" / "s0" / "result.json"
    cell.write_text(cell.read_text()[:50])
    rc, stdout, err = cli(capsys, "table", "--config", cfg)
    assert rc == 0, err
    assert str(cell) in stdout + err and "redo" in stdout + err
    assert json.loads(cell.read_text())["name"] == "lowres/lq/s0"


# --- messages ------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_15_a_malicious_pretrained_file_is_refused_in_cqds_words(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Payload(tmp_path / "PWNED")}, evil)
    cfg = write_yaml(tmp_path / "run.yaml", tiny_cfg(tmp_path, "run", method__name="lq"))
    msg = refused(capsys, "train", "--config", cfg, f"pretrained={evil}", names=(evil, "refused", "nothing in it ran"))
    assert "weights_only=False" not in msg and "\n" not in msg.strip()  # not torch's advice to run it
    with pytest.raises(CheckpointError, match="nothing in it ran"):
        create_model("resnet8", 10, 1, pretrained=str(evil))
    assert not (tmp_path / "PWNED").exists()


def test_16_an_sr_models_outputs_are_channels_not_classes(tmp_path, capsys):
    sr = sr_model(tmp_path)
    cls_cfg = write_yaml(tmp_path / "cls.yaml", tiny_cfg(tmp_path, "cls"))
    msg = refused(capsys, "eval", "--model", sr, "--config", cls_cfg, names=(sr,))
    assert "3 classes" not in msg and "task 'sr'" in msg
    from cqd.engine.model_files import load_model

    with pytest.raises(CheckpointError) as e:
        load_model(sr, num_classes=10)
    assert "3 output channels" in str(e.value) and "classes" not in str(e.value)
