"""The paper's Table 1 as a grid of runs: rows (named override sets, usually methods) x columns
(degradations and views) x seeds.

Each cell is a run folder with a `result.json`; a cell whose result exists and was made under the
same settings (`finished`) is skipped, so a grid is resumable; a result made under other settings
stops the grid (`CellMismatch`), and `--force` redoes cells. Several processes (or machines sharing the folder) can
work on one grid: a cell is claimed by creating its lock file exclusively, and a lock whose
process is gone (same host) is taken over. Each distinct teacher is trained once per seed and
shared by every cell that needs it. This is the `local` executor; Ray and SLURM run the same `run_cell` after the
same `prepare` (`cqd.experiments.executors`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import ValidationError

from cqd.config import format_errors
from cqd.engine.checkpoint import weight_settings
from cqd.engine.model_files import MODEL
from cqd.engine.schema import RunConfig
from cqd.engine.teachers import teacher_run_config
from cqd.engine.trainer import RESULT
from cqd.errors import CheckpointError, ConfigError
from cqd.experiments.locks import claim, holder
from cqd.experiments.rounds import round_config, rounds_of
from cqd.experiments.schema import GridConfig, RowConfig
from cqd.files import load_json, save_json
from cqd.methods import METHODS
from cqd.tasks import task_of

TEACHER_ROW = "hq"  # the row that evaluates the shared teacher f (A -> A and A -> B) instead of training


@dataclass
class Cell:
    kind: str  # "train" or "eval" (the teacher row: f evaluated on the column's views)
    cfg: RunConfig
    column: str | None = None  # None for a teacher's run
    row: str | None = None


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
                    "sr.test", "train.check_every", "data.root_lq", "data.test_lq_only")


# Keys added after the first grids were run (their shared teachers' folder names hold a digest without them).
_ADDED_LATER = {"plugins": [], "data.val_from": None, "teacher.train_subset": None, "teacher.epochs": None,
                "teacher.calibrate": False}


def _teacher_digest(tcfg: RunConfig) -> str:
    dump = tcfg.model_dump(exclude={"robustness"})  # (the sweep trains nothing)
    keep = {k: v for k, v in weight_settings(dump).items() if k not in _NOT_THE_TEACHER}
    for key, default in _ADDED_LATER.items():  # absent from earlier digests: left out while at their defaults
        if keep.get(key, default) in (default, None):
            keep.pop(key, None)
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


# Settings that do not change a cell's result: where it is written and read from, how it is shown, cached, fed and
# parallelized (`train.devices` and `num_nodes` stay: they set the global batch; `train.precision` stays: it sets the
# arithmetic). A `robustness:` sweep trains nothing and is not in a cell's result.
NOT_THE_RESULT = ("name", "out_dir", "cache_dir", "plugins", "data.root", "data.root_lq", "data.num_workers",
                  "data.twin_cache_mb", "train.progress", "train.eval_every", "train.check_every",
                  "train.feature_cache_mb", "train.cache_teacher", "train.accelerator", "train.strategy", "robustness")
# ... nor a shared teacher's: it trains on its own x (its folder names its view and seed), whatever the column's z
NOT_THE_TEACHERS_RESULT = NOT_THE_RESULT + ("data.degradation", "data.lq_view", "data.mix", "sr.test",
                                            "data.test_lq_only")


def fingerprint(config: Mapping, teacher: bool = False) -> dict[str, Any]:
    """The settings that shaped a cell's result, from its run config (a RunConfig's dump, or the `config` a
    result.json holds, of any cqd version: `migrate_config` first, so a classification config that still holds an
    `sr:` section compares equal): `weight_settings` less NOT_THE_RESULT (a shared teacher's: less
    NOT_THE_TEACHERS_RESULT; a QAT cell also less `train.precision`, as it trains in fp32 and records 32-true), with
    teacher checkpoints as paths relative to the cell's out_dir (a grid's shared teachers move with its folder), as
    JSON gives them back."""
    flat = weight_settings(config)
    skip = NOT_THE_TEACHERS_RESULT if teacher else NOT_THE_RESULT
    keep = {k: v for k, v in flat.items() if not any(k == s or k.startswith(s + ".") for s in skip)}
    if keep.get("compress.qat") is True:  # QAT trains in fp32 whatever train.precision says (the run records 32-true)
        keep.pop("train.precision", None)
    here = str(config.get("out_dir") or ".")

    def rel(path):
        return os.path.relpath(path, here) if isinstance(path, str) else path

    if "teacher.checkpoint" in keep:
        keep["teacher.checkpoint"] = rel(keep["teacher.checkpoint"])
    if isinstance(keep.get("teachers"), list):
        keep["teachers"] = [{**t, "checkpoint": rel(t.get("checkpoint"))} if isinstance(t, Mapping) else t
                            for t in keep["teachers"]]
    return json.loads(json.dumps(keep, default=str))


def _equal(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def changed(old: Mapping, new: Mapping, teacher: bool = False, ignore: tuple[str, ...] = ()) -> list[tuple]:
    """(key, old value, new value) of each setting that shaped a result and differs between two run configs (keys
    that only one of them has, from another cqd version, and the keys in `ignore` are not compared)."""
    a, b = fingerprint(old, teacher), fingerprint(new, teacher)
    return [(k, a[k], b[k]) for k in sorted(set(a) & set(b) - set(ignore)) if not _equal(a[k], b[k])]


class CellMismatch(ConfigError):
    """Finished cells whose results were made under other settings than the grid's now. `cells`: [(cell name,
    [(key, old, new), ...])]."""

    def __init__(self, cells: list[tuple[str, list[tuple[str, Any, Any]]]]):
        self.cells = cells
        shown = "; ".join(f"{name} (" + ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in diff[:3])
                          + (f" and {len(diff) - 3} more" if len(diff) > 3 else "") + ")" for name, diff in cells[:6])
        more = f"; and {len(cells) - 6} more cell(s)" if len(cells) > 6 else ""
        super().__init__(f"{len(cells)} finished cell(s) were trained under other settings than this config's, and "
                         f"would be reused as they are: {shown}{more}. Retrain them with --force (cqd table / cqd "
                         "sym; api: force=True), or give another out_dir to keep both; nothing was trained")


def finished(cfg: RunConfig, teacher: bool = False, ignore: tuple[str, ...] = ()) -> dict | None:
    """The result of cell `cfg` when it is finished under `cfg`'s settings; None when it has no result (or one that
    cannot be read: a warning names it, and the cell is redone); a CellMismatch when its result was made under
    other settings (`teacher`: the cell is a shared teacher, compared as such; `ignore`: keys an executor allows
    to differ, e.g. a study's searched keys for its own teacher). The one rule of every executor."""
    path = Path(cfg.out_dir) / RESULT
    if not path.is_file():
        return None
    try:
        res = load_json(path)
    except CheckpointError as e:
        warnings.warn(f"{e}: redoing cell {cfg.name}", stacklevel=2)
        return None
    if not isinstance(res, dict):
        warnings.warn(f"{path} holds no result (a {type(res).__name__}): redoing cell {cfg.name}", stacklevel=2)
        return None
    if isinstance(res.get("config"), Mapping):  # (results of every cqd version hold their config)
        rounds = rounds_of(cfg)
        # a sequential run's result written before it held the run's config holds its last round's
        made = cfg if rounds == 1 or "round_config" in res else round_config(cfg, rounds)
        diff = changed(res["config"], made.model_dump(), teacher, ignore)
        if diff:
            raise CellMismatch([(cfg.name, diff)])
    return res


def run_cell(kind: str, cfg: RunConfig, redo_before: float | None = None, teacher: bool = False,
             ignore: tuple[str, ...] = (), token: str | None = None, on_claim: Callable[[], None] | None = None
             ) -> dict | None:
    """Run one cell unless done or claimed by another process; returns its result (None if held elsewhere).
    The cell function of every executor (`cqd.experiments.executors`).

    Done: `finished` (a result made under the same settings; another result is a CellMismatch). With
    `redo_before` (a time.time()), a result written before then is redone (`--force`); one written since, e.g.
    by another process of the same forced grid, counts as done. `teacher`, `ignore`: as `finished` takes them.
    `token`: the executor task's name for its lock (`claim`); `on_claim()` is called once the cell is claimed to be
    run here.
    """
    from cqd.engine.evaluate import evaluate_saved
    from cqd.experiments.rounds import train

    out = Path(cfg.out_dir)
    result = out / RESULT

    def done() -> dict | None:
        if redo_before is not None and result.is_file() and result.stat().st_mtime < redo_before:
            return None
        return finished(cfg, teacher, ignore)

    if (res := done()) is not None:
        return res
    with claim(out, token) as mine:
        if not mine:
            return None
        if (res := done()) is not None:  # finished by another process between the check and the claim
            return res
        if on_claim is not None:
            on_claim()
        if redo_before is not None:
            for name in (RESULT, "last.ckpt", MODEL):
                (out / name).unlink(missing_ok=True)
        if kind == "train":
            return train(cfg, resume=True)
        t0 = time.perf_counter()
        teacher_result = load_json(Path(cfg.teacher.checkpoint).parent / RESULT)
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
        out.append((cell, load_json(path) if path.is_file() else None))
    return out


def prepare(grid: GridConfig, force: bool = False, log: Callable[[str], None] = print
            ) -> tuple[list[Cell], list[str], float | None]:
    """(every cell in run order, the names of those finished under the same settings, the `redo_before` cutoff of
    `run_cell`: now with `force`, else None), after checking every finished-looking cell (`finished`): one whose
    result was made under other settings stops the grid before anything is trained (a CellMismatch naming the cells
    and keys), unless `force`. Writes grid.json. Every executor starts here."""
    out = Path(grid.out_dir)
    cells, reused, stale = plan(grid, out), [], []
    for cell in cells:
        try:
            if finished(cell.cfg, teacher=cell.column is None) is not None:
                reused.append(cell.cfg.name)
        except CellMismatch as e:
            stale += e.cells
    if stale and not force:
        raise CellMismatch(stale)
    out.mkdir(parents=True, exist_ok=True)
    save_json(grid.model_dump(), out / "grid.json")
    if stale:
        log(f"--force: retraining {len(stale)} cell(s) trained under other settings: "
            + ", ".join(name for name, _ in stale))
    if force:
        reused = []
    elif reused:
        log(f"reused {len(reused)} finished cell(s) whose settings match this config: {', '.join(reused)}")
    return cells, reused, time.time() if force else None


def run_grid(grid: GridConfig, force: bool = False, on_cell: Callable[[str, dict], None] | None = None,
             poll_s: float = 5.0, note_s: float = 300.0, log: Callable[[str], None] = print) -> dict:
    """Run every cell not yet done (with `force`, every cell whose result predates this call); returns
    {"reused": names of the cells finished before this call under the same settings, not run again}.

    First every finished-looking cell is checked (`prepare`). A cell held by another process, or whose teacher
    another process is still training, is retried after the others; the call returns when every cell has a
    result. While only such cells are left, every `note_s` seconds `log` names the locks it waits for.
    """
    pending, reused, since = prepare(grid, force, log)
    noted = time.monotonic()
    while pending:
        waiting = []
        for cell in pending:
            if any(t.checkpoint is not None and not Path(t.checkpoint).is_file() for t in cell.cfg.teacher_list):
                waiting.append(cell)
                continue
            res = run_cell(cell.kind, cell.cfg, redo_before=since, teacher=cell.column is None)
            if res is None:
                waiting.append(cell)
            elif on_cell:
                on_cell(cell.cfg.name, res)
        if len(waiting) == len(pending):
            if time.monotonic() - noted >= note_s:
                _note_waiting(waiting, log)
                noted = time.monotonic()
            time.sleep(poll_s)
        pending = waiting
    return {"reused": reused}


def _note_waiting(waiting: list[Cell], log: Callable[[str], None]) -> None:
    """Name the locks a process waits on (every `note_s` while only held cells are left)."""
    held = [holder(Path(c.cfg.out_dir)) for c in waiting if (Path(c.cfg.out_dir) / ".lock").is_file()]
    log(f"waiting for {len(waiting)} cell(s) that other processes hold or need: {'; '.join(held[:3])}"
        + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        + ". A lock whose process is gone is taken over on its own host; from another host, delete it.")
