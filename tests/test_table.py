"""The Table 1 grid: every report file is written, finished cells are skipped, --force reruns them."""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from cqd.cli import main
from cqd.experiments.grid import plan, run_cell
from cqd.experiments.schema import load_grid_config


def _grid(tmp_path, tiny_config) -> str:
    base = tiny_config()
    base.pop("out_dir")
    base["train"].update(epochs=1, max_steps_per_epoch=2)
    grid = {
        "name": "tiny grid",
        "out_dir": str(tmp_path / "grid"),
        "seeds": [0],
        "columns": {"lowres": {"degradation": "lowres:size=8"}, "clutter": {"degradation": "clutter"}},
        "base": base,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return str(path)


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("result.json")}


def test_grid_writes_report_skips_done_cells_and_force_reruns(tmp_path, tiny_config, capsys):
    cfg = _grid(tmp_path, tiny_config)
    assert main(["table", "--config", cfg]) == 0
    out = capsys.readouterr().out
    report = tmp_path / "grid" / "report"
    for name in ("table.md", "table.json", "runs.csv", "runs.json", "table.png"):
        assert (report / name).stat().st_size > 0, name
    md = (report / "table.md").read_text()
    for label in ("A -> A", "A -> B", "B -> B", "A+B -> B", "A,B -> B", "CQD -> B", "gap closed", "Paper's Table 1"):
        assert label in md
    assert "| Method | lowres | clutter |" in md
    table = json.loads((report / "table.json").read_text())["table"]
    assert set(table) == {"lowres", "clutter"}
    assert all(table[c]["CQD -> B cqd (proposed)"]["n"] == 1 for c in table)
    # one teacher shared by both columns, 4 trained rows and 1 eval cell per column
    assert len(_mtimes(tmp_path / "grid")) == 1 + 2 * 5
    runs = json.loads((report / "runs.json").read_text())
    assert {r["method"] for r in runs} == {"hq", "lq", "augment", "staged", "cqd"}
    assert all(json.loads(r["config"])["seed"] == 0 for r in runs)
    assert ({r["precision"] for r in runs} == {"32-true"}
            and all(r["wall_s"] > 0 and r["images_per_s"] > 0 for r in runs))
    assert "[11/11" in out

    before = _mtimes(tmp_path / "grid")
    assert main(["table", "--config", cfg]) == 0
    assert _mtimes(tmp_path / "grid") == before

    forced_at = time.time()
    assert main(["table", "--config", cfg, "--force"]) == 0
    after = _mtimes(tmp_path / "grid")
    assert all(after[p] > before[p] for p in before)

    # a second process of the same forced grid (its cutoff: when it started) takes the new results as done
    grid = load_grid_config(cfg)
    assert all(run_cell(c.kind, c.cfg, redo_before=forced_at) for c in plan(grid, Path(grid.out_dir)))
    assert _mtimes(tmp_path / "grid") == after


def test_cell_held_by_a_live_process_is_skipped(tmp_path, tiny_config):
    from cqd.experiments.locks import claim

    grid = load_grid_config(_grid(tmp_path, tiny_config))
    first = plan(grid, Path(grid.out_dir))[0]
    kind, cfg = first.kind, first.cfg
    with claim(Path(cfg.out_dir)) as mine:
        assert mine
        with claim(Path(cfg.out_dir)) as again:
            assert not again
    (Path(cfg.out_dir) / ".lock").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": 1}))
    assert run_cell(kind, cfg) is None  # pid 1 is alive: another process holds the cell
    (Path(cfg.out_dir) / ".lock").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": 2**22 + 7}))
    assert run_cell(kind, cfg)["method"] == "hq"  # a dead owner's lock is taken over


def test_two_processes_share_one_grid(tmp_path, tiny_config):
    """Two `cqd table` processes on one folder: both finish, each cell is trained once, the report is whole."""
    import os
    import subprocess
    import sys

    cfg = _grid(tmp_path, tiny_config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"proc{i}.log", "w+") for i in range(2)]  # files: a full pipe would block a process
    procs = [subprocess.Popen([sys.executable, "-m", "cqd", "table", "--config", cfg], env=env,
                              stdout=log, stderr=subprocess.STDOUT, text=True) for log in logs]
    try:
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    outs = [(log.seek(0), log.read())[1] for log in logs]
    assert [p.returncode for p in procs] == [0, 0], outs
    names = [line.split(" epoch 1/1: ")[0] for out in outs for line in out.splitlines() if " epoch 1/1: " in line]
    assert len(names) == len(set(names)) == 1 + 2 * 4, names  # teacher + 4 trained rows per column, none twice
    table = json.loads((tmp_path / "grid" / "report" / "table.json").read_text())["table"]
    assert all(table[c][row]["n"] == 1 for c in table for row in table[c] if not row.startswith("gap closed"))


def test_a_lock_from_another_host_is_named_while_waiting_and_the_grid_goes_on_once_it_is_gone(tmp_path, tiny_config):
    import threading

    from cqd.experiments.grid import run_grid

    grid = load_grid_config(_grid(tmp_path, tiny_config))
    cfg = plan(grid, Path(grid.out_dir))[-1].cfg
    lock = Path(cfg.out_dir) / ".lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "another-host", "pid": 1234}))
    said, errors = [], []

    def work():
        try:
            run_grid(grid, poll_s=0.05, note_s=0.2, log=said.append)
        except BaseException as e:  # a thread's exception would otherwise never reach the test
            errors.append(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while not said and worker.is_alive():
            worker.join(0.05)
        if errors:
            raise errors[0]
        assert said and str(lock) in said[0] and "host another-host, pid 1234" in said[0] and "delete it" in said[0]
        assert not (Path(cfg.out_dir) / "result.json").exists()
    finally:
        lock.unlink(missing_ok=True)  # what the user does once the other host's process is gone
    worker.join(120)
    if errors:
        raise errors[0]
    assert not worker.is_alive() and (Path(cfg.out_dir) / "result.json").is_file()


def test_api_table_takes_a_file_or_a_loaded_grid(tmp_path, tiny_config):
    from cqd import api

    cfg = _grid(tmp_path, tiny_config)
    first = api.table(cfg)
    assert "| Method | lowres | clutter |" in first["markdown"] and Path(first["report_dir"], "table.md").is_file()
    before = _mtimes(tmp_path / "grid")
    again = api.table(load_grid_config(cfg))  # a loaded grid: the same folder, every cell already done
    assert again["markdown"] == first["markdown"] and _mtimes(tmp_path / "grid") == before


def test_rows_are_named_variants_two_of_one_method_train_apart_and_both_are_in_the_table(tmp_path, tiny_config):
    """Rows are named override sets: two CQD rows with different lambda are two cells each, listed in the
    grid's order with their labels; a staged row and a `method.init: teacher` row use the column's shared f."""
    from cqd import api

    base = tiny_config()
    base.pop("out_dir")
    base["train"].update(epochs=1, max_steps_per_epoch=2)
    grid = {"name": "variants", "out_dir": str(tmp_path / "grid"), "seeds": [0],
            "rows": ["lq",
                     {"id": "cqd_l1", "label": "CQD, lambda 1", "set": {"method.name": "cqd", "method.cqd.lam": 1}},
                     {"id": "cqd_l50", "set": {"method.name": "cqd", "method.cqd.lam": 50}},
                     {"id": "lq_init_f", "label": "B from f", "set": {"method.name": "lq", "method.init": "teacher"}}],
            "columns": {"lowres": {"degradation": "lowres:size=8"}}, "base": base}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    g = load_grid_config(str(path))
    cells = plan(g, Path(g.out_dir))
    teacher = tmp_path / "grid" / "teachers" / "full-none" / "s0" / "model.pt"
    assert [c.kind for c in cells] == ["train"] * 5 and cells[1].cfg.teacher.checkpoint is None  # lq needs no f
    assert [c.cfg.teacher.checkpoint for c in cells[2:]] == [str(teacher)] * 3  # one shared f, init: teacher too
    assert [c.cfg.method.cqd.lam for c in cells[2:4]] == [1, 50]
    md = api.table(str(path))["markdown"]
    lines = [ln.split(" |")[0].lstrip("| ") for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert lines == ["B -> B fine-tuning", "CQD, lambda 1", "CQD -> B cqd (proposed)", "B from f"]
    lams = {json.loads((Path(c.cfg.out_dir) / "result.json").read_text())["config"]["method"]["cqd"]["lam"]
            for c in cells[2:4]}
    assert lams == {1, 50}
    assert len(list((tmp_path / "grid" / "teachers").rglob("model.pt"))) == 1  # f trained once


def test_a_row_that_changes_the_teacher_gets_its_own_shared_teacher(tmp_path, tiny_config):
    base = tiny_config()
    base.pop("out_dir")
    grid = load_grid_config_dict(tmp_path, {
        "name": "t", "out_dir": str(tmp_path / "grid"), "seeds": [0, 1],
        "rows": ["cqd", {"id": "cqd_big_f", "set": {"method.name": "cqd", "teacher.model": "resnet14"}},
                 {"id": "cqd_lr", "set": {"method.name": "cqd", "train.lr": 0.01}}],
        "columns": {"a": {"degradation": "lowres:size=8"}, "b": {"degradation": "blur"}},
        "base": base})
    cells = plan(grid, Path(grid.out_dir))
    teachers = [c.cfg for c in cells if c.column is None]
    folders = sorted(str(Path(t.out_dir).relative_to(tmp_path / "grid")) for t in teachers)
    assert len(folders) == 4 and {"teachers/full-none/s0", "teachers/full-none/s1"} <= set(folders)
    other = [f for f in folders if f.startswith("teachers/full-none-")]  # resnet14: a digest of its settings
    assert len(other) == 2 and len({f.rsplit("/", 1)[0] for f in other}) == 1
    assert {t.model for t in teachers} == {"resnet8", "resnet14"}
    lr_row = [c for c in cells if c.row == "cqd_lr"]
    # a student-lr row shares f
    assert all(c.cfg.teacher.checkpoint.endswith(f"teachers/full-none/s{c.cfg.seed}/model.pt") for c in lr_row)


def load_grid_config_dict(tmp_path, grid: dict):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return load_grid_config(str(path))


def test_a_bad_row_is_named_when_the_grid_is_loaded(tmp_path, tiny_config):
    import pytest

    from cqd.errors import ConfigError

    base = tiny_config()
    with pytest.raises(ConfigError) as e:
        load_grid_config_dict(tmp_path, {"columns": {"a": {"degradation": "blur"}}, "base": base,
                                         "rows": ["lq",
                                                  {"id": "x", "set": {"method.name": "cqd", "method.cqd.lamb": 3}}]})
    assert ("row 'x' in column 'a'" in str(e.value)
            and "method.cqd.lamb: unknown key; did you mean 'lam'?" in str(e.value))


def test_a_row_of_method_hq_that_sets_only_the_teacher_evaluates_that_shared_teacher(tmp_path):
    """`{id: r14, set: {method.name: hq, teacher: {model: resnet14}}}` evaluates the resnet14 that another
    row uses as one of its teachers (one shared run), instead of training a network of its own; a row of
    method hq that also sets a student key trains."""
    cfg = {"name": "g", "out_dir": str(tmp_path), "seeds": [0],
           "rows": ["hq",
                    {"id": "r14", "set": {"method.name": "hq", "teacher": {"model": "resnet14"}}},
                    {"id": "ens", "set": {"method.name": "ens", "teacher": {},
                                          "teachers": [{"model": "resnet14"}, {"model": "resnet8"}]}},
                    {"id": "x_lr", "set": {"method.name": "hq", "train.lr": 0.01}}],
           "columns": {"lowres": {"degradation": "lowres:size=4"}},
           "base": {"model": "resnet8", "teacher": {"model": "resnet8"}, "data": {"image_size": 16}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cells = plan(load_grid_config(str(path)), tmp_path)
    by_row = {c.row: c for c in cells if c.row}
    assert {r: c.kind for r, c in by_row.items()} == {"hq": "eval", "r14": "eval", "ens": "train", "x_lr": "train"}
    teachers = [c for c in cells if c.kind == "train" and c.row is None]
    assert sorted(t.cfg.model for t in teachers) == ["resnet14", "resnet8"]  # each trained once, shared
    r14 = next(t for t in teachers if t.cfg.model == "resnet14")
    assert (by_row["r14"].cfg.teacher.checkpoint == by_row["ens"].cfg.teachers[0].checkpoint
            == str(Path(r14.cfg.out_dir) / "model.pt"))
    assert by_row["hq"].cfg.teacher.checkpoint == by_row["ens"].cfg.teachers[1].checkpoint


def test_runs_csv_names_the_view_a_shared_teacher_was_measured_on(tmp_path, tiny_config):
    """`cqd tune` trains a grid's teacher in the column it tunes, which need not be the first: the table's
    runs.csv then gives that teacher's accuracy on z with the column it was measured on, not the first's."""
    import csv

    from cqd import api
    from cqd.experiments.grid import shared_teacher
    from cqd.experiments.schema import RowConfig

    g = load_grid_config(_grid(tmp_path, tiny_config))
    g.rows = [RowConfig(id="hq", set={"method.name": "hq"})]  # only the teacher row: A -> A, A -> B
    tcfg = shared_teacher(g, "clutter", g.rows[0], 0, 0, Path(g.out_dir))  # as `cqd tune` on the clutter column
    assert tcfg.data.degradation == "clutter"
    trained = run_cell("train", tcfg)
    api.table(g)
    runs = list(csv.DictReader(open(Path(g.out_dir) / "report" / "runs.csv")))
    teacher = [r for r in runs if r["kind"] == "train"]
    assert len(teacher) == 1 and teacher[0]["name"] == tcfg.name
    assert (teacher[0]["degradation"], float(teacher[0]["acc_lq"])) == ("clutter", trained["acc_lq"])
    assert json.loads(teacher[0]["config"])["data"]["degradation"] == "clutter"
    assert {r["degradation"] for r in runs if r["kind"] == "eval"} == {"lowres:size=8", "clutter"}
