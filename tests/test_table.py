"""The Table 1 grid: every report file is written, finished cells are skipped, --force reruns them."""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from cqd.cli import main
from cqd.config import load_grid_config
from cqd.engine.grid import plan, run_cell


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
    assert all(table[c]["CQD -> B"]["n"] == 1 for c in table)
    # one teacher shared by both columns, 4 trained rows and 1 eval cell per column
    assert len(_mtimes(tmp_path / "grid")) == 1 + 2 * 5
    runs = json.loads((report / "runs.json").read_text())
    assert {r["method"] for r in runs} == {"hq", "lq", "augment", "staged", "cqd"}
    assert all(json.loads(r["config"])["seed"] == 0 for r in runs)
    assert {r["precision"] for r in runs} == {"32-true"} and all(r["wall_s"] > 0 and r["images_per_s"] > 0 for r in runs)
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
    assert all(run_cell(kind, c, redo_before=forced_at) for kind, c in plan(grid, Path(grid.out_dir)))
    assert _mtimes(tmp_path / "grid") == after


def test_cell_held_by_a_live_process_is_skipped(tmp_path, tiny_config):
    from cqd.engine.grid import claim

    grid = load_grid_config(_grid(tmp_path, tiny_config))
    kind, cfg = plan(grid, Path(grid.out_dir))[0]
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
    procs = [subprocess.Popen([sys.executable, "-m", "cqd", "table", "--config", cfg], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    names = [line.split(" epoch 1/1: ")[0] for out in outs for line in out.splitlines() if " epoch 1/1: " in line]
    assert len(names) == len(set(names)) == 1 + 2 * 4, names  # teacher + 4 trained rows per column, none twice
    table = json.loads((tmp_path / "grid" / "report" / "table.json").read_text())["table"]
    assert all(table[c][row]["n"] == 1 for c in table for row in table[c] if row != "gap closed")


def test_a_lock_from_another_host_is_named_while_waiting_and_the_grid_goes_on_once_it_is_gone(tmp_path, tiny_config):
    import threading
    from cqd.engine.grid import run_grid

    grid = load_grid_config(_grid(tmp_path, tiny_config))
    _, cfg = plan(grid, Path(grid.out_dir))[-1]
    lock = Path(cfg.out_dir) / ".lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "another-host", "pid": 1234}))
    said = []
    worker = threading.Thread(target=run_grid, args=(grid,), kwargs={"poll_s": 0.05, "note_s": 0.2, "log": said.append})
    worker.start()
    while not said and worker.is_alive():
        worker.join(0.05)
    assert said and str(lock) in said[0] and "host another-host, pid 1234" in said[0] and "delete it" in said[0]
    assert not (Path(cfg.out_dir) / "result.json").exists()
    lock.unlink()  # what the user does once the other host's process is gone
    worker.join(120)
    assert not worker.is_alive() and (Path(cfg.out_dir) / "result.json").is_file()


def test_api_table_takes_a_file_or_a_loaded_grid(tmp_path, tiny_config):
    from cqd import api

    cfg = _grid(tmp_path, tiny_config)
    first = api.table(cfg)
    assert "| Method | lowres | clutter |" in first["markdown"] and Path(first["report_dir"], "table.md").is_file()
    before = _mtimes(tmp_path / "grid")
    again = api.table(load_grid_config(cfg))  # a loaded grid: the same folder, every cell already done
    assert again["markdown"] == first["markdown"] and _mtimes(tmp_path / "grid") == before
