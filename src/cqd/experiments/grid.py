"""The paper's Table 1 as a grid of runs: rows (named override sets, usually methods) x columns
(degradations and views) x seeds.

Each cell is a run folder with a `result.json`; a cell whose result exists is skipped, so a grid
is resumable and `--force` redoes cells. Several processes (or machines sharing the folder) can
work on one grid: a cell is claimed by creating its lock file exclusively, and a lock whose
process is gone (same host) is taken over. Each distinct teacher is trained once per seed and
shared by every cell that needs it.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml
from pydantic import ValidationError

from cqd.config import format_errors
from cqd.engine.checkpoint import weight_settings
from cqd.engine.model_files import MODEL
from cqd.engine.schema import RunConfig
from cqd.engine.teachers import teacher_run_config
from cqd.engine.trainer import RESULT
from cqd.errors import ConfigError
from cqd.experiments.schema import GridConfig, RowConfig
from cqd.files import save_json
from cqd.methods import METHODS
from cqd.tasks import task_of

TEACHER_ROW = "hq"  # the row that evaluates the shared teacher f (A -> A and A -> B) instead of training


@dataclass
class Cell:
    kind: str  # "train" or "eval" (the teacher row: f evaluated on the column's views)
    cfg: RunConfig
    column: str | None = None  # None for a teacher's run
    row: str | None = None


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
    """Yield True if this process owns `cell` (exclusive lock file), False if another live one does.

    The lock is written whole under a temporary name and hard-linked into place (link fails if the
    lock exists), so no lock is ever seen empty or half-written by another process. A lock that cannot
    be read (left by something else, or a truncated disk write) is taken over once it is older than
    UNREADABLE_LOCK_S; one from a dead process on this host at once.
    """
    cell.mkdir(parents=True, exist_ok=True)
    lock = cell / ".lock"
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    tmp = cell / f".lock.{me['host']}.{me['pid']}.tmp"
    tmp.write_text(json.dumps(me))
    try:
        for _ in range(2):
            try:
                os.link(tmp, lock)
            except FileExistsError:
                if not _stale(lock, me["host"]):
                    yield False
                    return
                lock.unlink(missing_ok=True)
                continue
            try:
                yield True
            finally:
                lock.unlink(missing_ok=True)
            return
        yield False
    finally:
        tmp.unlink(missing_ok=True)


UNREADABLE_LOCK_S = 60.0


def _stale(lock: Path, host: str) -> bool:
    try:
        owner = json.loads(lock.read_text())
        pid = int(owner["pid"])
    except FileNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return time.time() - lock.stat().st_mtime > UNREADABLE_LOCK_S
        except FileNotFoundError:
            return True
    return owner.get("host") == host and not _alive(pid)


def flatten(nested: dict, prefix: str = "") -> dict:
    """{'method': {'cqd': {'lam': 50}}} -> {'method.cqd.lam': 50}: a best.yaml back to dotted overrides."""
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def tuned_values(row: RowConfig, column: str) -> dict | None:
    """The dotted keys a tuned row's cells in `column` take from its best.yaml (None for an untuned row)."""
    if row.tuned is None:
        return None
    path = Path(row.tuned.replace("{column}", column))
    if not path.is_file():
        how = ("run `cqd tune` on this grid config first (it tunes every row with `tune:` in every column)" if row.tune
               else "point `tuned:` at the best.yaml that `cqd tune` wrote")
        raise ConfigError(f"row {row.id!r} in column {column!r} uses tuned settings from {path}, "
                          f"which does not exist: {how}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"row {row.id!r}: {path} is not valid YAML ({e}); "
                          "rerun `cqd tune` to write it again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"row {row.id!r}: {path} should hold config keys (a mapping), as `cqd tune` writes it")
    return flatten(data)


def cell_config(grid: GridConfig, column: str, row: RowConfig, seed: int, out: Path, tuned: bool = True) -> RunConfig:
    """One cell's run, in `out/cells/<column>/<row>/s<seed>`; a tuned row's values applied unless `tuned` is False
    (as a study of that row trains it)."""
    values = tuned_values(row, column) if tuned else None
    try:
        cfg = grid.cell(column, row, seed, values)
    except ValidationError as e:
        raise ConfigError(f"row {row.id!r} in column {column!r} with its tuned settings {row.tuned}: "
                          + format_errors(e, "", type(grid.base)).split(":\n", 1)[-1].strip()) from None
    cfg.name = f"{column}/{row.id}/s{seed}"
    cfg.out_dir = str(out / "cells" / column / row.id / f"s{seed}")
    cfg.cache_dir = str(out / "cache")
    return cfg


# Settings that do not change a teacher's weights: left out when telling teachers apart.
_NOT_THE_TEACHER = ("name", "out_dir", "cache_dir", "seed", "data.degradation", "data.lq_view", "data.twin_cache_mb",
                    "data.num_workers", "train.progress", "train.eval_every", "train.cache_teacher",
                    "train.feature_cache_mb", "data.hq_view", "data.hq_degradation", "data.mix",
                    "sr.test", "train.check_every")


def _teacher_digest(tcfg: RunConfig) -> str:
    keep = {k: v for k, v in weight_settings(tcfg.model_dump()).items() if k not in _NOT_THE_TEACHER}
    if not keep.get("plugins"):  # a key added later: absent from earlier digests while unused
        keep.pop("plugins", None)
    keep.update(task_of(tcfg).legacy_digest)
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:8]


def shared_teacher(grid: GridConfig, column: str, row: RowConfig, seed: int, k: int, out: Path) -> RunConfig:
    """Teacher k of a cell as a run of its own. It follows the base and the column, and of the row only
    its `teacher`/`teachers` keys (a row that tunes the student's lr still shares f). Its folder is
    `teachers/<view>/s<seed>` for the base's teacher (today's layout), `teachers/<view>-<digest>/s<seed>`
    for a teacher whose settings differ."""
    own = {key: v for key, v in row.set.items() if key.split(".")[0] in ("teacher", "teachers")}
    tcfg = teacher_run_config(grid.cell(column, RowConfig(id=row.id, set=own), seed), k)
    view = f"{tcfg.data.hq_view}-{tcfg.data.hq_degradation}".replace(":", "_").replace("+", "_")
    base = grid.base.model_copy(deep=True)
    base.seed = seed
    if _teacher_digest(tcfg) != _teacher_digest(teacher_run_config(base, 0)):
        view += f"-{_teacher_digest(tcfg)}"
    tcfg.name = f"teacher/{view}/s{tcfg.seed}"
    tcfg.out_dir = str(out / "teachers" / view / f"s{tcfg.seed}")
    tcfg.cache_dir = str(out / "cache")
    return tcfg


def _evaluates_a_teacher(row: RowConfig, teacher_method: str = TEACHER_ROW) -> bool:
    """The teacher row `hq`, and any row of method hq that sets only the teacher (e.g. `{id: r14, set:
    {method.name: hq, teacher: {model: resnet14}}}`): f is evaluated on the column's views, not trained
    again (a row that also sets the student's keys trains a network on x)."""
    keys = set(row.set) - {"method.name"}
    return (row.set.get("method.name") == teacher_method
            and all(k.split(".")[0] in ("teacher", "teachers") for k in keys))


def plan(grid: GridConfig, out: Path) -> list[Cell]:
    """Every cell in run order, seed by seed: each teacher before the first cell that needs it, then the
    column's rows. A cell's teachers are pointed at the shared teachers' model.pt."""
    cells: list[Cell] = []
    seen = set()
    for seed in grid.seeds:
        for column in grid.columns:
            for row in grid.rows:
                cfg = cell_config(grid, column, row, seed, out)
                evaluates_f = _evaluates_a_teacher(row, task_of(cfg).teacher_method)  # sr: sr_teacher
                if evaluates_f or METHODS.get(cfg.method.name).needs_teacher(cfg):
                    for k, t in enumerate(cfg.teacher_list):
                        if t.checkpoint is None:
                            tcfg = shared_teacher(grid, column, row, seed, k, out)
                            if tcfg.out_dir not in seen:
                                seen.add(tcfg.out_dir)
                                cells.append(Cell("train", tcfg))
                            t.checkpoint = str(Path(tcfg.out_dir) / MODEL)
                cells.append(Cell("eval" if evaluates_f else "train", cfg, column, row.id))
    return cells


def run_cell(kind: str, cfg: RunConfig, redo_before: float | None = None) -> dict | None:
    """Run one cell unless done or claimed by another process; returns its result (None if held elsewhere).

    With `redo_before` (a time.time()), a result written before then is redone (`--force`); one
    written since, e.g. by another process of the same forced grid, counts as done.
    """
    from cqd.engine.evaluate import evaluate_saved
    from cqd.experiments.rounds import train

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
        res = {**teacher_result, "name": cfg.name, "degradation": cfg.data.degradation, **task_of(cfg).result(res),
               "eval_s": time.perf_counter() - t0, "config": cfg.model_dump()}
        save_json(res, result)
        return res


def collect(grid: GridConfig) -> list[tuple[Cell, dict | None]]:
    """(cell, result or None) for every cell, whoever ran it."""
    out = []
    for cell in plan(grid, Path(grid.out_dir)):
        path = Path(cell.cfg.out_dir) / RESULT
        out.append((cell, json.loads(path.read_text()) if path.is_file() else None))
    return out


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
        for cell in pending:
            if any(t.checkpoint is not None and not Path(t.checkpoint).is_file() for t in cell.cfg.teacher_list):
                waiting.append(cell)
                continue
            res = run_cell(cell.kind, cell.cfg, redo_before=since)
            if res is None:
                waiting.append(cell)
            elif on_cell:
                on_cell(cell.cfg.name, res)
        if len(waiting) == len(pending):
            if time.monotonic() - noted >= note_s:
                held = [holder(Path(c.cfg.out_dir)) for c in waiting if (Path(c.cfg.out_dir) / ".lock").is_file()]
                log(f"waiting for {len(waiting)} cell(s) that other processes hold or need: {'; '.join(held[:3])}"
                    + (f" and {len(held) - 3} more" if len(held) > 3 else "")
                    + ". A lock whose process is gone is taken over on its own host; from another host, delete it.")
                noted = time.monotonic()
            time.sleep(poll_s)
        pending = waiting
