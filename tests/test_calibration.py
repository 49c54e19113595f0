"""Teacher calibration (temperature scaling, ECE) and the privileged teacher (`teacher.train_subset`)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cqd.api import train
from cqd.cli import main
from cqd.engine.calibration import ece, fit_temperature, nll
from cqd.engine.schema import run_config
from cqd.engine.teachers import teacher_run_config
from cqd.errors import ConfigError
from cqd.files import load_checkpoint, load_json
from cqd.tasks.classification.data import split_items
from helpers import tiny_cfg


def test_ece_of_four_items_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.7 (right), 0.55 (wrong): bins (13/15, 14/15], (10/15, 11/15], (8/15, 9/15]
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.45, 0.55]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    want = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(1 - 0.7) + 1 / 4 * abs(0 - 0.55)
    assert ece(p.log(), labels) == pytest.approx(want, abs=1e-9)


def test_overconfident_logits_get_a_temperature_above_one_and_a_lower_nll():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 10, generator=g) * 2
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)  # calibrated at T = 1 by construction
    over = 3 * z  # made overconfident on purpose
    t = fit_temperature(over, labels)
    assert t > 1
    assert nll(over, labels, t) < nll(over, labels)
    assert ece(over / t, labels) < ece(over, labels)
    # the NLL's minimum found by a plain search over T, independent of the LBFGS fit
    grid = [1 + i * 0.005 for i in range(800)]
    best = min(grid, key=lambda s: nll(over, labels, s))
    assert t == pytest.approx(best, abs=0.006)
    assert t == pytest.approx(3, rel=0.1)


def test_calibrate_needs_a_validation_split_and_class_logits(tmp_path):
    with pytest.raises(ConfigError, match="data.val_fraction"):
        run_config(tiny_cfg(tmp_path, "r", teacher__calibrate=True))
    with pytest.raises(ConfigError, match="class logits"):
        run_config({"task": "sr", "method": {"name": "sr_fitnet"}, "teacher": {"calibrate": True}})
    assert main(["train", "--config", "/dev/null", "--set", "teacher.calibrate=true", f"out_dir={tmp_path}/x"]) == 2


def _cache_tables(root: Path) -> dict[str, dict]:
    return {p.name: load_checkpoint(p) for p in sorted((root / "cache").glob("teacher-*.pt"))}


def test_a_calibrated_teacher_distils_from_its_logits_divided_by_t(tmp_path, capsys):
    over = {"data__val_fraction": 0.25, "data__train_subset": 96, "teacher__checkpoint": None}
    plain = train(tiny_cfg(tmp_path, "plain", **over))
    before = _cache_tables(tmp_path)
    assert len(before) == 1
    cfg = tiny_cfg(tmp_path, "cal", teacher__calibrate=True, **over)
    cfg["teacher"]["checkpoint"] = plain["teacher"]  # the same f
    cal = train(cfg)
    out = capsys.readouterr().out
    assert "teacher 0 calibrated on 24 validation items" in out
    c = cal["teacher_calibration"][0]
    assert plain["teacher_calibration"] == [None]
    after = _cache_tables(tmp_path)
    new = [v for k, v in after.items() if k not in before]
    assert len(new) == 1  # its own cache entry (the temperature is part of the key)
    raw = next(iter(before.values()))["logits"]
    assert new[0]["temperature"] == c["temperature"]
    seen = ~raw[:, 0].isnan()
    assert torch.allclose(new[0]["logits"][seen] * c["temperature"], raw[seen], atol=1e-5)
    assert c["nll_after"] <= c["nll_before"] + 1e-9
    assert math.isfinite(c["ece_after"]) and 0 <= c["ece_before"] <= 1
    assert cal["acc_lq"] is not None


def test_a_privileged_teacher_trains_on_more_items_but_never_the_validation_items(tmp_path):
    cfg = run_config(tiny_cfg(tmp_path, "s", data__train_subset=200, data__val_fraction=0.1,
                              teacher__train_subset=1000, teacher__epochs=3))
    tcfg = teacher_run_config(cfg, 0)
    assert tcfg.train.epochs == 3 and tcfg.data.train_subset == 1000
    n = 60000
    student_train, student_val = split_items(cfg.data, n)
    teacher_train, teacher_val = split_items(tcfg.data, n)
    first_1000 = set(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:1000].tolist())
    assert set(teacher_val) == set(student_val) and len(student_val) == 20
    assert set(teacher_train) == first_1000 - set(student_val)
    assert set(student_train) < set(teacher_train)
    everything = run_config(tiny_cfg(tmp_path, "a", data__train_subset=200, data__val_fraction=0.1,
                                     teacher__train_subset="all"))
    t_all, v_all = split_items(teacher_run_config(everything, 0).data, n)
    assert set(v_all) == set(student_val) and len(t_all) == n - 20


def test_a_privileged_teacher_has_its_own_folder_weights_and_cache_entry(tmp_path):
    own = train(tiny_cfg(tmp_path, "own", data__val_fraction=0.25))
    priv = train(tiny_cfg(tmp_path, "priv", data__val_fraction=0.25, teacher__train_subset=128))
    assert own["teacher"] != priv["teacher"]
    t_own = load_json(Path(own["teacher"]).parent / "result.json")["config"]["data"]
    t_priv = load_json(Path(priv["teacher"]).parent / "result.json")["config"]["data"]
    assert (t_own["train_subset"], t_own["val_from"]) == (64, None)
    assert (t_priv["train_subset"], t_priv["val_from"]) == (128, 64)
    assert len(_cache_tables(tmp_path)) == 2
