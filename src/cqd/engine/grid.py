"""The paper's Table 1 as a grid of runs: rows (methods) x columns (degradations) x seeds.

Each cell is a run folder with a `result.json`; a cell whose result exists is skipped, so a grid
is resumable and `--force` redoes cells. Several processes (or machines sharing the folder) can
work on one grid: a cell is claimed by creating its lock file exclusively, and a lock whose
process is gone (same host) is taken over.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from cqd.config import GridConfig, RunConfig
from cqd.engine.checkpoint import save_json
from cqd.engine.trainer import MODEL, RESULT
from cqd.methods import METHODS

TEACHER_ROW = "hq"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def claim(cell: Path):
    """Yield True if this process owns `cell` (exclusive lock file), False if another live one does."""
    cell.mkdir(parents=True, exist_ok=True)
    lock = cell / ".lock"
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            stale = owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1)))
            if not stale:
                yield False
                return
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    yield False


def cell_config(grid: GridConfig, column: str, method: str, seed: int, out: Path) -> RunConfig:
    col = grid.columns[column]
    cfg = grid.base.model_copy(deep=True)
    cfg.seed = seed
    cfg.name = f"{column}/{method}/s{seed}"
    cfg.data.degradation, cfg.data.hq_view, cfg.data.lq_view = col.degradation, col.hq_view, col.lq_view
    cfg.method.name = method
    cfg.out_dir = str(out / "cells" / column / method / f"s{seed}")
    cfg.cache_dir = str(out / "cache")
    return cfg


def teacher_config(grid: GridConfig, column: str, seed: int, out: Path) -> RunConfig:
    """f for a column: trained once per (high-quality view, seed) and shared by every column with that view."""
    cfg = cell_config(grid, column, TEACHER_ROW, seed, out)
    view = f"{cfg.data.hq_view}-{cfg.data.hq_degradation}".replace(":", "_").replace("+", "_")
    cfg.model = cfg.teacher.model or cfg.model
    cfg.name = f"teacher/{view}/s{seed}"
    cfg.out_dir = str(out / "teachers" / view / f"s{seed}")
    return cfg


def plan(grid: GridConfig, out: Path) -> list[tuple[str, RunConfig]]:
    """Every cell in run order: teachers first, then each column's rows, seed by seed."""
    cells: list[tuple[str, RunConfig]] = []
    seen = set()
    for seed in grid.seeds:
        for column in grid.columns:
            t = teacher_config(grid, column, seed, out)
            if t.out_dir not in seen:
                seen.add(t.out_dir)
                cells.append(("train", t))
            for method in grid.rows:
                cfg = cell_config(grid, column, method, seed, out)
                cls = METHODS.get(method)
                if method == TEACHER_ROW or cls.uses_teacher or cls.init_from_teacher != "never":
                    cfg.teacher.checkpoint = str(Path(t.out_dir) / MODEL)
                cells.append(("eval" if method == TEACHER_ROW else "train", cfg))
    return cells


def run_cell(kind: str, cfg: RunConfig, redo_before: float | None = None) -> dict | None:
    """Run one cell unless done or claimed by another process; returns its result (None if held elsewhere).

    With `redo_before` (a time.time()), a result written before then is redone (`--force`); one
    written since, e.g. by another process of the same forced grid, counts as done.
    """
    from cqd.engine.evaluate import evaluate_saved
    from cqd.engine.trainer import train

    out = Path(cfg.out_dir)
    result = out / RESULT

    def done() -> bool:
        return result.is_file() and (redo_before is None or result.stat().st_mtime >= redo_before)

    if done():
        return json.loads(result.read_text())
    with claim(out) as mine:
        if not mine:
            return None
        if done():  # finished by another process between the check and the claim
            return json.loads(result.read_text())
        if redo_before is not None:
            for name in (RESULT, "last.ckpt", MODEL):
                (out / name).unlink(missing_ok=True)
        if kind == "train":
            return train(cfg, resume=True)
        t0 = time.perf_counter()
        teacher_result = json.loads((Path(cfg.teacher.checkpoint).parent / RESULT).read_text())
        res = evaluate_saved(cfg.teacher.checkpoint, cfg)
        res = {**teacher_result, "name": cfg.name, "degradation": cfg.data.degradation, "acc_lq": res["acc_lq"],
               "acc_hq": res["acc_hq"], "eval_s": time.perf_counter() - t0, "config": cfg.model_dump()}
        save_json(res, result)
        return res


def collect(grid: GridConfig) -> list[tuple[str, RunConfig, dict | None]]:
    """(kind, config, result or None) for every cell, whoever ran it."""
    out = Path(grid.out_dir)
    rows = []
    for kind, cfg in plan(grid, out):
        path = Path(cfg.out_dir) / RESULT
        rows.append((kind, cfg, json.loads(path.read_text()) if path.is_file() else None))
    return rows


def holder(cell: Path) -> str:
    """Who holds `cell`'s lock, for a message."""
    lock = cell / ".lock"
    try:
        owner = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        owner = {}
    return f"{lock} (host {owner.get('host', '?')}, pid {owner.get('pid', '?')})"


def run_grid(grid: GridConfig, force: bool = False, on_cell: Callable[[str, dict], None] | None = None,
             poll_s: float = 5.0, note_s: float = 300.0, log: Callable[[str], None] = print) -> None:
    """Run every cell not yet done (with `force`, every cell whose result predates this call).

    A cell held by another process, or whose teacher another process is still training, is
    retried after the others; the call returns when every cell has a result. While only such
    cells are left, every `note_s` seconds `log` names the locks it waits for.
    """
    out = Path(grid.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_json(grid.model_dump(), out / "grid.json")
    pending, noted, since = plan(grid, out), time.monotonic(), time.time() if force else None
    while pending:
        waiting = []
        for kind, cfg in pending:
            teacher = cfg.teacher.checkpoint
            if teacher is not None and not Path(teacher).is_file():
                waiting.append((kind, cfg))
                continue
            res = run_cell(kind, cfg, redo_before=since)
            if res is None:
                waiting.append((kind, cfg))
            elif on_cell:
                on_cell(cfg.name, res)
        if len(waiting) == len(pending):
            if time.monotonic() - noted >= note_s:
                held = [holder(Path(c.out_dir)) for _, c in waiting if (Path(c.out_dir) / ".lock").is_file()]
                log(f"waiting for {len(waiting)} cell(s) that other processes hold or need: {'; '.join(held[:3])}"
                    + (f" and {len(held) - 3} more" if len(held) > 3 else "")
                    + ". A lock whose process is gone is taken over on its own host; from another host, delete it.")
                noted = time.monotonic()
            time.sleep(poll_s)
        pending = waiting
