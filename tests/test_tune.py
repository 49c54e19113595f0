"""`data.val_fraction` and `cqd tune`: the validation split, and Optuna studies that resume, prune and are shared."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cqd.api import train, tune
from cqd.engine.schema import load_run_config, run_config
from cqd.engine.trainer import Run
from cqd.errors import ConfigError
from cqd.experiments.schema import load_tune_config
from cqd.experiments.tune import storage
from cqd.tasks.classification.data import build_datasets
from helpers import tiny_cfg

LAM = {"low": 1, "high": 300, "log": True}
LR = {"low": 0.01, "high": 0.1, "log": True}


def tune_cfg(root: Path, **over) -> dict:
    """A study of tiny CQD runs (16 of the 64 training items held out) searching lambda and lr."""
    base = tiny_cfg(root, "base", data__val_fraction=0.25)
    return {"name": "study", "out_dir": str(root / "tune"), "base": base,
            "search": {"method.cqd.lam": LAM, "train.lr": LR}, "n_trials": 3, **over}


def trials(tc: dict) -> list:
    return optuna.load_study(study_name=tc["name"], storage=storage(load_tune_config(tc))).get_trials()


def indices(loader) -> list[int]:
    return [i for batch in loader for i in batch["index"].tolist()]


def test_validation_items_are_held_out_of_training_and_fixed_by_the_data_seed(tmp_path):
    cfg = tiny_cfg(tmp_path, "run", method__name="lq", data__val_fraction=0.25)
    run = Run.start(run_config(cfg))
    trained, held = indices(run.s.loader), indices(run.s.val_loader)
    all_items, test_items, _, _ = build_datasets(run_config(tiny_cfg(tmp_path, "all", method__name="lq")))  # no split
    assert len(held) == 16 and set(trained) | set(held) == set(all_items.indices) and not set(trained) & set(held)
    assert indices(run.s.test_loader) == test_items.indices  # the test set is untouched

    again = Run.start(run_config(tiny_cfg(tmp_path, "again", seed=1, method__name="lq", data__val_fraction=0.25)))
    assert indices(again.s.val_loader) == held  # another run (and run seed): the same validation items
    other = Run.start(run_config(tiny_cfg(tmp_path, "other", method__name="lq", data__val_fraction=0.25, data__seed=1)))
    assert set(indices(other.s.val_loader)) != set(held)


def test_runs_report_validation_top1_on_x_and_z_to_the_epoch_callback_and_result(tmp_path):
    seen = []
    cfg = tiny_cfg(tmp_path, "run", method__name="lq", data__val_fraction=0.25, train__epochs=2, train__eval_every=1)
    from cqd.engine.trainer import train as engine_train

    res = engine_train(cfg, on_epoch=seen.append)
    assert [sorted(k for k in row if k.startswith("val_")) for row in seen] == [["val_acc_hq", "val_acc_lq"]] * 2
    assert res["val_acc_lq"] == seen[-1]["val_acc_lq"] and 0 <= res["val_acc_hq"] <= 1
    assert train(tiny_cfg(tmp_path, "off", method__name="lq"))["val_acc_lq"] is None  # off by default


def test_a_study_completes_continues_on_a_second_call_and_its_best_yaml_trains(tmp_path):
    tc = tune_cfg(tmp_path)
    first = tune(tc)
    assert first["trials"] == {"complete": 3} and len(trials(tc)) == 3
    second = tune(tc, "n_trials=4")  # the same study, continued to 4 trials
    assert second["trials"] == {"complete": 4} and [t.number for t in trials(tc)] == [0, 1, 2, 3]
    assert tune(tc, "n_trials=4")["trials"] == {"complete": 4}  # a finished study: no trial more, the report again
    # searched, or no effect
    assert tune(tc, "base.train.lr=0.5", "base.train.progress=true")["trials"] == {"complete": 4}
    # a study recorded by a version whose classification runs held an sr section continues: another task's section
    study = optuna.load_study(study_name=tc["name"], storage=storage(load_tune_config(tc)))
    study.set_user_attr("settings", {**study.user_attrs["settings"], "sr.patch": 48})
    assert tune(tc)["trials"] == {"complete": 4}
    with pytest.raises(ConfigError, match=r"was started with base.train.epochs=1 \(now 2\)"):
        tune(tc, "n_trials=5", "base.train.epochs=2")  # trials of other settings would mix into the study's
    assert len(trials(tc)) == 4
    out = Path(tc["out_dir"])
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001", "0002", "0003"]
    assert (out / "optimization_history.png").is_file() and (out / "param_importances.png").is_file()
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + 4

    best = yaml.safe_load((out / "best.yaml").read_text())
    assert set(best) == {"method", "train"} and set(best["method"]["cqd"]) == {"lam"} and set(best["train"]) == {"lr"}
    assert best["method"]["cqd"]["lam"] == second["best"]["params"]["method.cqd.lam"]
    command = next(line for line in (out / "best.yaml").read_text().splitlines() if "cqd train --config" in line)
    path, *overrides = command.split("--config ")[1].split()  # the command best.yaml's header gives, as typed
    cfg = load_run_config(path, [*overrides, f"out_dir={tmp_path / 'best'}", "train.progress=false"])
    assert cfg.method.cqd.lam == best["method"]["cqd"]["lam"] and cfg.train.lr == best["train"]["lr"]
    merged = load_run_config(path).model_dump()  # or the fragment merged into the base
    merged["method"]["cqd"].update(best["method"]["cqd"])
    merged["train"].update(best["train"], progress=False)
    assert run_config(merged) == cfg.model_copy(update={"out_dir": merged["out_dir"]})
    res = train(cfg)
    assert res["config"]["method"]["cqd"]["lam"] == best["method"]["cqd"]["lam"] and res["acc_lq"] is not None


def test_a_trial_the_pruner_stops_ends_early_and_is_recorded_as_pruned(tmp_path, monkeypatch):
    # a pruner that prunes every reported value (top-1 is never above 2), in the place of the median pruner
    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **kw: optuna.pruners.ThresholdPruner(lower=2.0))
    tc = tune_cfg(tmp_path, n_trials=1)
    tc["base"]["train"].update(epochs=3, eval_every=1)
    assert tune(tc)["trials"] == {"pruned": 1}
    (t,) = trials(tc)
    assert t.state == TrialState.PRUNED and list(t.intermediate_values) == [1]
    # 1 of 3 epochs
    assert len(yaml.safe_load((Path(t.user_attrs["out_dir"]) / "result.json").read_text())["history"]) == 1
    assert not (Path(tc["out_dir"]) / "best.yaml").exists()


def test_two_processes_on_one_sqlite_study_both_add_trials(tmp_path):
    tc = tune_cfg(tmp_path, n_trials=8)
    tc["base"]["method"]["name"] = "lq"  # no teacher: trials start at once
    tc["search"] = {"train.lr": LR}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(tc))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "cqd", "tune", "--config", str(path)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    done = [t for t in trials(tc) if t.state == TrialState.COMPLETE]
    assert len(done) >= 8 and len({t.user_attrs["worker"] for t in done}) == 2


@pytest.mark.parametrize("key, rng, message", [
    ("method.cqd.lam", {"low": 300, "high": 1}, r"search.method.cqd.lam: low \(300\) is above high \(1\)"),
    ("method.cqd.lam", {"low": 0, "high": 300, "log": True}, r"search.method.cqd.lam: a log range must lie above 0"),
    ("train.lr", {"low": -0.1, "high": 0.1, "log": True}, r"search.train.lr: a log range must lie above 0"),
    ("method.cqd.lamda", LAM, r"search key 'method.cqd.lamda' .* unknown key; did you mean 'lam'"),
    ("train.lr", {"low": 0, "high": 0.1},
     r"search key 'train.lr' with value 0.0 does not make a valid run: train.lr: Input should be greater than 0"),
    ("method.fitnet.beta", LAM,
     r"search key 'method.fitnet.beta' is a setting of method 'fitnet', but base.method.name is 'cqd'"),
])
def test_bad_search_spaces_are_errors_that_name_the_key(tmp_path, key, rng, message):
    with pytest.raises(ConfigError, match=message):
        load_tune_config(tune_cfg(tmp_path, search={key: rng}))


def test_startup_trials_set_tpes_random_phase_and_a_study_inside_it_says_it_is_random_search(tmp_path, monkeypatch,
                                                                                             capsys):
    made = []
    real = optuna.samplers.TPESampler
    monkeypatch.setattr(optuna.samplers, "TPESampler", lambda **kw: made.append(kw) or real(**kw))
    tune(tune_cfg(tmp_path / "a"), "n_trials=1")
    assert (made[-1]["n_startup_trials"] == 10
            and "TPE draws every trial of this study at random" in capsys.readouterr().out)
    tune(tune_cfg(tmp_path / "b"), "n_trials=2", "startup_trials=1")
    assert made[-1]["n_startup_trials"] == 1 and "at random" not in capsys.readouterr().out


def test_overrides_reach_search_keys_that_hold_dots(tmp_path):
    tc = tune_cfg(tmp_path, search={"method.cqd.lam": LAM, "train.lr": {"low": 0.01, "high": 0.5, "log": True}})
    got = load_tune_config(tc, ["search.method.cqd.lam.high=100", "search.method.cqd.T={low: 2, high: 4}",
                                "search.train.lr.log=false", "base.train.lr=0.2"])
    assert (got.search["method.cqd.lam"].low, got.search["method.cqd.lam"].high) == (LAM["low"], 100)
    assert (got.search["method.cqd.T"].low, got.search["method.cqd.T"].high) == (2, 4)
    assert got.search["train.lr"].log is False and got.base.train.lr == 0.2
    assert set(got.search) == {"method.cqd.lam", "method.cqd.T", "train.lr"}  # no nested `method: {cqd: ...}` entry
    with pytest.raises(ConfigError, match=r"search key 'method.cqd.lamda' .* did you mean 'lam'"):
        load_tune_config(tc, ["search.method.cqd.lamda={low: 1, high: 2}"])


def test_a_study_without_validation_items_or_on_several_devices_is_refused(tmp_path):
    tc = tune_cfg(tmp_path)
    tc["base"]["data"]["val_fraction"] = 0
    with pytest.raises(ConfigError, match="never on the test set: set base.data.val_fraction"):
        tune(tc)
    with pytest.raises(ConfigError, match="start one `cqd tune` per device"):
        tune(tune_cfg(tmp_path), "base.train.devices=2")


def tuned_grid(root: Path, **over) -> dict:
    """Two columns; B untuned beside B and CQD each tuned per column (2 trials a study), 16 of 64 items held out."""
    base = tiny_cfg(root, "base", data__val_fraction=0.25)
    for key in ("name", "out_dir", "cache_dir"):
        base.pop(key)
    return {"name": "tuned", "out_dir": str(root / "grid"), "seeds": [0],
            "columns": {"lowres": {"degradation": "lowres:size=4"}, "blur": {"degradation": "blur:sigma=2"}},
            "rows": ["lq", {"id": "lq_tuned", "set": {"method.name": "lq"}, "tune": {"train.lr": LR}},
                    {"id": "cqd_tuned", "set": {"method.name": "cqd"}, "tune": {"method.cqd.lam": LAM}}],
            "tune": {"n_trials": 2}, "base": base, **over}


def test_a_grid_tunes_each_row_in_each_column_and_its_cells_train_with_the_best_values(tmp_path):
    from cqd.api import table

    grid = tuned_grid(tmp_path)
    with pytest.raises(ConfigError, match=r"row 'lq_tuned' in column 'lowres' uses tuned settings from "
                                          r".*grid/tune/lowres/lq_tuned/best.yaml, which does not exist: "
                                          r"run `cqd tune` on this grid config"):
        table(grid)
    reports = tune(grid)
    assert {c: sorted(r) for c, r in reports.items()} == {"lowres": ["cqd_tuned", "lq_tuned"],
                                                          "blur": ["cqd_tuned", "lq_tuned"]}
    out = tmp_path / "grid"
    teachers = [p.parent for p in (out / "teachers").rglob("model.pt")]
    assert len(teachers) == 1  # the grid's own seed-0 teacher (f sees x, the same in both columns), trained once
    for column in ("lowres", "blur"):
        study = optuna.load_study(study_name=f"tuned/{column}/cqd_tuned",
                                  storage=f"sqlite:///{out / 'tune' / column / 'cqd_tuned' / 'study.db'}")
        assert len(study.trials) == 2
        for t in study.trials:  # each trial trained the column's cell against that teacher
            cfg = yaml.safe_load((Path(t.user_attrs["out_dir"]) / "result.json").read_text())["config"]
            assert cfg["data"]["degradation"] == grid["columns"][column]["degradation"]
            assert cfg["teacher"]["checkpoint"] == str(teachers[0] / "model.pt")

    res = table(grid)
    for column in ("lowres", "blur"):
        lr = yaml.safe_load((out / "tune" / column / "lq_tuned" / "best.yaml").read_text())["train"]["lr"]
        lam = yaml.safe_load((out / "tune" / column / "cqd_tuned" / "best.yaml").read_text())["method"]["cqd"]["lam"]
        def got(row):
            return yaml.safe_load((out / "cells" / column / row / "s0" / "result.json").read_text())["config"]
        assert got("lq_tuned")["train"]["lr"] == lr and got("lq")["train"]["lr"] == 0.05
        assert got("cqd_tuned")["method"]["cqd"]["lam"] == lam and got("cqd_tuned")["train"]["lr"] == 0.05
        assert f"lr={lr:.3g}" in res["markdown"] and f"lam={lam:.3g}" in res["markdown"]
    labels = [line.split(" | ")[0] for line in res["markdown"].splitlines() if line.startswith("| ")]
    assert (sum(label.endswith("(tuned)") for label in labels) == 2
            and any("fine-tuning" in lab and "tuned)" not in lab for lab in labels))


def test_tuned_rows_need_a_validation_split_and_a_valid_search_space(tmp_path):
    grid = tuned_grid(tmp_path)
    grid["base"]["data"]["val_fraction"] = 0
    with pytest.raises(ConfigError, match="row 'lq_tuned' is tuned on a validation split, never on the test set"):
        tune(grid)
    grid = tuned_grid(tmp_path)
    grid["rows"][1]["tune"] = {"method.cqd.lam": LAM}
    with pytest.raises(ConfigError, match=r"row 'lq_tuned': tune key 'method.cqd.lam' "
                                          r"is a setting of method 'cqd', but base.method.name is 'lq'"):
        tune(grid)
    with pytest.raises(ConfigError, match="this grid has no row to tune"):
        tune(tuned_grid(tmp_path, rows=["lq"]))


def test_a_trial_whose_process_was_killed_is_marked_failed_by_the_next_trial(tmp_path):
    import time

    tc = tune_cfg(tmp_path, n_trials=1, heartbeat_s=1)
    tc["base"]["method"]["name"] = "lq"
    tc["search"] = {"train.lr": LR}
    Path(tc["out_dir"]).mkdir()
    study = optuna.create_study(study_name="study", storage=storage(load_tune_config(tc)), direction="maximize")
    killed = study.ask()  # a trial left running, as by a process that was killed mid-trial
    study._storage.record_heartbeat(killed._trial_id)
    time.sleep(3.5)  # silent for more than 2 heartbeats (the storage keeps whole seconds)
    assert tune(tc)["trials"] == {"complete": 1, "fail": 1}
    assert [t.state for t in trials(tc)] == [TrialState.FAIL, TrialState.COMPLETE]
