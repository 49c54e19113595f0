"""`cqd tune`: choose a method's settings (CQD's lambda and T, any method's learning rate) on the validation
split with Optuna, as the paper chose T and lambda "on the validation set". The test set is never looked at.

A study: Optuna's TPE sampler draws the searched keys; each trial trains the base run with them in
`<out_dir>/trials/NNNN`, reports val top-1 on z at each evaluated epoch to a median pruner through the
engine's per-epoch callback (a pruned trial stops there), and returns its final val top-1 on z, which the
study maximizes. The study lives in an Optuna storage (SQLite in out_dir by default, any database URL, or Optuna's
journal file on a shared folder: `journal:PATH`) opened with `load_if_exists`, so a second call, process, machine
or executor worker running the same config continues it until `n_trials` trials have finished. The teachers are
trained once per study, shared by every trial.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cqd.config import apply_overrides, dotted
from cqd.engine.checkpoint import weight_settings
from cqd.engine.model_files import MODEL
from cqd.engine.schema import RunConfig, run_config
from cqd.engine.teachers import teacher_run_config
from cqd.errors import ConfigError, TrainingDiverged
from cqd.experiments.schema import GridConfig, SearchRange, TuneConfig
from cqd.files import save_json, save_text
from cqd.methods import METHODS
from cqd.tasks import TASKS

OBJECTIVE = "val_acc_lq"  # top-1 of g on z, on the validation items
BEST, TRIALS_CSV, HISTORY_PNG, IMPORTANCE_PNG = ("best.yaml", "trials.csv", "optimization_history.png",
                                                 "param_importances.png")


def tune(tc: TuneConfig, log: Callable[[str], None] = print, poll_s: float = 5.0) -> dict:
    """Run (or continue) the study of `tc` in this process until it holds `n_trials` finished trials; write its
    report. (Workers on Ray or SLURM: `cqd.experiments.executors.study`.)"""
    return write_report(work(tc, log, poll_s), tc, log)


def open_study(tc: TuneConfig, log: Callable[[str], None] = print, worker: int = 0):
    """(the study of `tc`, created or loaded, its settings checked against its first call's (`same_study`), its
    storage). Worker `worker` of several started at once draws apart from the others."""
    import optuna

    check_storage(tc)
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = storage(tc)
    study = optuna.create_study(study_name=tc.study_name or tc.name, storage=store, load_if_exists=True,
                                direction="maximize", pruner=optuna.pruners.MedianPruner(
                                    n_startup_trials=tc.pruner.n_startup_trials,
                                    n_warmup_steps=tc.pruner.n_warmup_steps))
    # a call that joins or continues a study must not repeat the first call's draws: offset the seed by the trials
    # so far (and by the worker); constant_liar: a running trial (of any process) counts as a poor result, so
    # parallel trials spread out
    study.sampler = optuna.samplers.TPESampler(seed=tc.seed + len(study.trials) + 7919 * worker, constant_liar=True,
                                               n_startup_trials=tc.startup_trials)
    if tc.n_trials <= tc.startup_trials and worker == 0:
        log(f"note: n_trials={tc.n_trials} <= startup_trials={tc.startup_trials}: TPE draws every trial of this "
            "study at random (its start-up phase); raise n_trials or lower startup_trials for TPE's model to choose")
    same_study(study, tc)
    save_json(tc.model_dump(mode="json"), out / "tune.json")
    return study, store


def work(tc: TuneConfig, log: Callable[[str], None] = print, poll_s: float = 5.0, worker: int = 0):
    """Run trials of the study of `tc` (its teachers first) until it holds `n_trials` finished ones; returns it."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    study, store = open_study(tc, log, worker)
    base = shared_teachers(tc, log, poll_s)
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    left = tc.n_trials - len(study.get_trials(deepcopy=False, states=finished))
    if left > 0:
        log(f"study {study.study_name!r}: {left} of {tc.n_trials} trials to run, maximizing {OBJECTIVE}")
        study.optimize(lambda trial: objective(trial, tc, base, store), n_trials=left, catch=(TrainingDiverged,),
                       callbacks=[MaxTrialsCallback(tc.n_trials, states=finished)], show_progress_bar=worker == 0)
    else:
        log(f"study {study.study_name!r} already holds {tc.n_trials} finished trials")
    return study


# Base settings that may differ between the calls and machines of one study: they do not change a trial's result.
_NOT_THE_STUDY = ("name", "out_dir", "cache_dir", "data.root", "data.num_workers", "data.twin_cache_mb",
                  "train.progress", "train.accelerator", "train.strategy", "train.feature_cache_mb",
                  "train.check_every", "plugins")


def same_study(study, tc: TuneConfig) -> None:
    """Record what the study searches, and on what base (its searched keys aside), with its first call; a later
    call with other settings is an error (its trials would mix with the study's), not a silent continuation."""
    base = weight_settings(tc.base.model_dump(mode="json"))
    settings = {"search": tc.model_dump(mode="json")["search"],
                **{k: v for k, v in base.items() if k not in _NOT_THE_STUDY and k not in tc.search}}
    settings = json.loads(json.dumps(settings))  # as the storage gives it back
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", settings)
        return
    # another task's section does not touch this study's trials (studies started before each task owned its
    # section recorded the sr section's defaults in classification studies)
    other = set(TASKS.names()) - {tc.base.task}
    diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k)
                  and k.split(".")[0] not in other)
    if diff:
        shown = ", ".join(f"{'' if k == 'search' else 'base.'}{k}={saved.get(k)!r} (now {settings.get(k)!r})"
                          for k in diff[:3])
        raise ConfigError(f"study {study.study_name!r} was started with {shown}{' and more' if len(diff) > 3 else ''}; "
                          "continue it with the same settings, or start another study (study_name or out_dir)")


JOURNAL = "journal:"  # storage: journal:PATH, Optuna's journal file (a shared folder, no database server)


def storage_url(tc) -> str:
    """The study's storage: `tc.storage` (a database URL or journal:PATH), or SQLite in out_dir."""
    return tc.storage or f"sqlite:///{(Path(tc.out_dir) / 'study.db').resolve()}"


def check_storage(tc) -> None:
    """`tc.storage` is a database URL that a study can live in, checked before anything is trained: a dialect
    SQLAlchemy knows (with its driver installed), not an in-memory SQLite database (the study would vanish when the
    process ends, and no other process could join it), and for SQLite a file in a folder that exists and can be
    written (the default's folder, out_dir, is made by `tune`). Otherwise a ConfigError naming the storage."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    if tc.storage is None:
        return
    url = tc.storage
    advice = ("give e.g. sqlite:///runs/tune/study.db, postgresql://host/db, mysql://host/db or "
              "journal:/shared/study.log (Optuna's journal file), or leave storage unset")
    if url.startswith(JOURNAL):
        path = Path(url[len(JOURNAL):])
        folder = path.parent
        if not url[len(JOURNAL):] or path.is_dir():
            raise ConfigError(f"storage={url!r}: give the journal file's path after journal:, e.g. journal:runs/tune/"
                              "study.log (on a folder every worker shares)")
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"storage={url!r}: the folder of the journal file, {folder}, "
                              f"{'does not exist' if not folder.is_dir() else 'cannot be written'}; {advice}")
        return
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"storage={url!r} is not a database URL a study can use ({type(e).__name__}: {first}); "
                          f"{advice} (SQLite in out_dir)") from None
    if parsed.get_backend_name() != "sqlite":
        return
    db = parsed.database or ""
    if db in ("", ":memory:") or db.startswith("file::memory:") or "mode=memory" in db:
        raise ConfigError(f"storage={url!r} is an SQLite database in memory: the study would vanish when this process "
                          f"ends, and no other process could share it; give a file ({advice})")
    folder = Path(db).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        why = "does not exist" if not folder.is_dir() else "cannot be written"
        raise ConfigError(f"storage={url!r}: the folder of {db}, {folder}, {why}; {advice}")


def storage(tc: TuneConfig, attempts: int = 5):
    """`tc.storage`, or SQLite in out_dir (waiting up to a minute for another process's write lock). Two
    processes that open a new database at once race to create its tables: the loser opens it again. A database
    that cannot be opened is a ConfigError naming it."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    check_storage(tc)
    url = storage_url(tc)
    if url.startswith(JOURNAL):  # no heartbeats: `fail_dead_trials` judges a running trial by its host and pid
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len(JOURNAL):]))
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna (since 2.9)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=tc.heartbeat_s,
                                                  grace_period=2 * tc.heartbeat_s)
        except (IntegrityError, OperationalError) as e:
            if attempt == attempts - 1:
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise ConfigError(f"storage={url!r} cannot be opened ({type(e).__name__}: {first}); check the URL, "
                                  "the server and its permissions") from None
            time.sleep(0.5 * (attempt + 1))


def tune_grid(grid: GridConfig, log: Callable[[str], None] = print, poll_s: float = 5.0,
              study: Callable[..., dict] | None = None) -> dict:
    """Tune every row with `tune:` in every column: one study per (column, row) on the grid's first seed, in
    `<out_dir>/tune/<column>/<row>`, whose best.yaml the row's cells then read. A study's trials train the cell
    as the grid would (the row's settings, the column's twins) against the grid's own teacher of that seed,
    trained here once if the grid has not yet. Start the same command in several processes to share the studies.
    `study(tc, log, poll_s)` runs each study (default `tune`; the grid's executor: `executors.study`)."""
    from cqd.experiments.grid import cell_config, shared_teacher

    out, seed, reports = Path(grid.out_dir), grid.seeds[0], {}
    check_storage(grid.tune)  # before any teacher is trained
    rows = [r for r in grid.rows if r.tune]
    if not rows:
        raise ConfigError("this grid has no row to tune: give a row a search space, e.g. "
                          "{id: cqd_tuned, set: {method.name: cqd}, "
                          "tune: {train.lr: {low: 0.01, high: 0.3, log: true}}}")
    for column in grid.columns:
        for row in rows:
            cfg = cell_config(grid, column, row, seed, out, tuned=False)
            train_teachers(cfg, lambda k: shared_teacher(grid, column, row, seed, k, out), log, poll_s)
            where = out / "tune" / column / row.id
            tc = TuneConfig(name=f"{grid.name}/{column}/{row.id}", out_dir=str(where), base=cfg, search=row.tune,
                            executor=grid.executor, **grid.tune.model_dump())
            log(f"tuning row {row.id!r} in column {column!r}: {', '.join(row.tune)} "
                f"({grid.tune.n_trials} trials, seed {seed})")
            reports.setdefault(column, {})[row.id] = (study or tune)(tc, log, poll_s)
    return reports


def shared_teachers(tc: TuneConfig, log: Callable[[str], None], poll_s: float) -> dict:
    """The base run as a dict, its teachers trained once (with the base's settings) in `<out_dir>/teacher*`,
    by whichever process of the study gets there first, and given to every trial as checkpoints."""
    cfg = tc.base.model_copy(deep=True)
    cfg.out_dir = tc.out_dir
    # the study's teachers stay what its first call trained: its searched keys' base values may differ later
    # (`same_study` checks the rest), so they are not compared
    train_teachers(cfg, lambda k: teacher_run_config(cfg, k), log, poll_s, ignore=tuple(tc.search))
    return cfg.model_dump()


def train_teachers(cfg: RunConfig, teacher_run: Callable[[int], RunConfig], log: Callable[[str], None],
                   poll_s: float, ignore: tuple[str, ...] = ()) -> None:
    """Point each teacher of `cfg` without a checkpoint at its model.pt, training teacher k's run `teacher_run(k)`
    first (or waiting while another process trains it); a finished teacher made under other settings (but
    `ignore`) is a CellMismatch, the grids' rule."""
    from cqd.experiments.grid import run_cell
    from cqd.experiments.locks import holder

    if not METHODS.get(cfg.method.name).needs_teacher(cfg):
        return
    for k, t in enumerate(cfg.teacher_list):
        if t.checkpoint is None:
            tcfg = teacher_run(k)
            while run_cell("train", tcfg, teacher=True, ignore=ignore) is None:
                log(f"waiting for teacher {tcfg.name}, trained by another process: {holder(Path(tcfg.out_dir))}")
                time.sleep(poll_s)
            t.checkpoint = str(Path(tcfg.out_dir) / MODEL)


def suggest(trial, key: str, r: SearchRange) -> Any:
    if r.kind == "categorical":
        return trial.suggest_categorical(key, r.choices)
    if r.kind == "int":
        return trial.suggest_int(key, int(r.low), int(r.high), step=int(r.step or 1), log=r.log)
    return trial.suggest_float(key, r.low, r.high, step=r.step, log=r.log)


def trial_config(base: dict, tc: TuneConfig, params: dict[str, Any], number: int) -> RunConfig:
    """The base run with the trial's values, in `<out_dir>/trials/NNNN`."""
    where = {"name": f"{tc.name}/trial{number:04d}", "out_dir": str(Path(tc.out_dir) / "trials" / f"{number:04d}")}
    return run_config(apply_overrides(base, dotted({**params, **where})))


def objective(trial, tc: TuneConfig, base: dict, store=None) -> float:
    """Train one trial; its value is the last val top-1 on z. Raises optuna.TrialPruned when the pruner stopped it
    early. On a journal storage, running trials of dead workers are marked failed first."""
    import optuna

    from cqd.experiments.rounds import train

    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # which machine and process runs it
    if store is not None and storage_url(tc).startswith(JOURNAL):
        fail_dead_trials(trial.study, store)
    cfg = trial_config(base, tc, {key: suggest(trial, key, r) for key, r in tc.search.items()}, trial.number)
    trial.set_user_attr("out_dir", cfg.out_dir)
    result = train(cfg, on_epoch=pruning_callback(trial), force=True)  # the trial's folder is the study's
    epochs = len(result["history"])
    if epochs < cfg.train.epochs:  # stopped by the pruner (a trial that ran all its epochs is complete)
        raise optuna.TrialPruned(f"{cfg.name}: pruned after epoch {epochs} of {cfg.train.epochs} "
                                 f"({OBJECTIVE}={result[OBJECTIVE]:.4f})")
    return result[OBJECTIVE]


def fail_dead_trials(study, store) -> list[int]:
    """Mark failed each running trial whose worker (`host:pid`, as it recorded) ran on this host and is gone, the
    grid's locks' rule (a storage without heartbeats: the journal); returns their numbers. A worker on another host
    is judged there, by the next trial it starts."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from cqd.experiments.locks import alive

    failed, host = [], socket.gethostname()
    study_id = store.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        where, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if where == host and pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            try:
                store.set_trial_state_values(store.get_trial_id_from_study_id_trial_number(study_id, t.number),
                                             TrialState.FAIL)
            except UpdateFinishedTrialError:  # another worker marked it first
                continue
            failed.append(t.number)
            warnings.warn(f"trial {t.number} of study {study.study_name!r} was left running by {where}:{pid}, a "
                          "process that is gone: marked failed", stacklevel=2)
    return failed


def pruning_callback(trial) -> Callable[[dict], bool]:
    """The engine's `on_epoch`: report val top-1 on z of each evaluated epoch; True (stop) when Optuna prunes."""

    def on_epoch(row: dict) -> bool:
        if OBJECTIVE not in row:
            return False
        trial.report(row[OBJECTIVE], row["epoch"])
        return trial.should_prune()

    return on_epoch


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'method.cqd.lam': 50} -> {'method': {'cqd': {'lam': 50}}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def write_report(study, tc: TuneConfig, log: Callable[[str], None] = print) -> dict:
    """best.yaml (the best trial's searched keys), trials.csv and Optuna's plots, in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    out = Path(tc.out_dir)
    save_text(study.trials_dataframe().to_csv(index=False), out / TRIALS_CSV)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    states = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    report = {"study": study.study_name, "trials": {k: v for k, v in states.items() if v}, "best": None,
              "out_dir": str(out)}
    if not complete:
        log(f"no completed trial yet: {BEST} not written")
    else:
        best = study.best_trial
        base = out / "base.yaml"
        save_text(yaml.safe_dump(tc.base.model_dump(mode="json"), sort_keys=False), base)
        overrides = " ".join(dotted(best.params))
        header = (f"# The best of study {study.study_name!r}: {OBJECTIVE}={best.value:.4f} (trial {best.number}, "
                  f"{best.user_attrs.get('out_dir')}), chosen on the validation split.\n"
                  f"# Train with it: cqd train --config {base} {overrides}\n")
        save_text(header + yaml.safe_dump(nest(best.params), sort_keys=False), out / BEST)
        report["best"] = {"value": best.value, "trial": best.number, "params": best.params}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if complete:
            _save(plots.plot_optimization_history(study), out / HISTORY_PNG, plt)
        if len(complete) >= 2:
            _save(plots.plot_param_importances(study), out / IMPORTANCE_PNG, plt)
        else:
            log(f"parameter importance needs 2 completed trials, the study has {len(complete)}: "
                f"{IMPORTANCE_PNG} not written")
    save_json(report, out / "tune_result.json")
    return report


def _save(ax, path: Path, plt) -> None:
    ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
