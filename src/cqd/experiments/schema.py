"""The configs above one run: a grid (`cqd table`: rows x columns x seeds of runs) and a study (`cqd tune`).

Both hold a `base:` run, validated by the run schema of its task (`cqd.engine.schema`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from cqd.compress.schema import DeployConfig
from cqd.config import apply_overrides, dotted, format_errors, load_yaml, validate
from cqd.degradations import check_spec
from cqd.degradations.sweep import expand
from cqd.engine.schema import RunConfig, schema_of
from cqd.errors import ConfigError
from cqd.experiments.executor_config import ExecutorConfig, executor_section
from cqd.methods import METHODS
from cqd.schema import MAX_SEED, Strict

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$"  # ids name folders: no slashes or spaces


class ColumnConfig(Strict):
    """A column: the degradation and views (as today), and optionally more overrides (`set`) and a label."""

    degradation: str | None = Field(None, description="sets data.degradation")
    hq_view: Literal["full", "crop"] = "full"
    lq_view: Literal["full", "crop"] = "full"
    label: str | None = None
    set: dict[str, Any] = Field({}, description="more overrides, `key: value` as on the command line")

    @field_validator("degradation")
    @classmethod
    def _spec(cls, v: str | None) -> str | None:
        return check_spec(v)

    def overrides(self) -> dict[str, Any]:
        base = {"data.hq_view": self.hq_view, "data.lq_view": self.lq_view}
        if self.degradation is not None:
            base["data.degradation"] = self.degradation
        return {**base, **self.set}


class SearchRange(Strict):
    """How `cqd tune` draws one key: a range `{low, high}` (`log: true` for a log scale, `type: int` for whole
    numbers, `step` for a grid of values) or a list of `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    type: Literal["float", "int", "categorical"] | None = Field(None, description="default: categorical with "
                                                                                  "choices, else float")
    choices: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _range(self) -> "SearchRange":
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.type not in (None, "categorical"):
                raise ValueError("give either choices or a range {low, high}, not both")
            return self
        if self.low is None or self.high is None or self.type == "categorical":
            raise ValueError("give a range {low, high} (e.g. {low: 1, high: 300, log: true}) or a list of choices")
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) is above high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range must lie above 0; low is {self.low:g}")
        if self.log and self.step is not None:
            raise ValueError("a log range takes no step")
        if self.type == "int" and any(v is not None and v != int(v) for v in (self.low, self.high, self.step)):
            raise ValueError("an int range needs whole low, high and step")
        return self

    @property
    def kind(self) -> str:
        return "categorical" if self.choices is not None else self.type or "float"

    def values(self) -> list[Any]:
        """The values a config must accept: the ends of the range, or every choice."""
        if self.kind == "categorical":
            return list(self.choices)
        return [int(v) for v in (self.low, self.high)] if self.kind == "int" else [self.low, self.high]


class PrunerConfig(Strict):
    """Optuna's MedianPruner: a trial stops when its val top-1 on z falls below the median of earlier trials at
    that epoch."""

    n_startup_trials: int = Field(5, ge=0, description="trials that are never pruned, to build the median")
    n_warmup_steps: int = Field(0, ge=0, description="epochs of each trial that are never pruned")


class StudySettings(Strict):
    """Optuna's settings of a study (of `cqd tune`, or of each row x column study of a grid's `tune:`)."""

    n_trials: int = Field(16, ge=1, description="finished trials (complete, pruned or failed) of the study in all, "
                                                 "whichever processes ran them")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds the TPE sampler")
    startup_trials: int = Field(10, ge=1, description="TPE's start-up trials, drawn at random before it models the "
                                                      "results (Optuna's default 10); a study of no more trials is "
                                                      "random search")
    storage: str | None = Field(None, description="a database URL (e.g. postgresql://host/db) or journal:PATH "
                                                  "(Optuna's journal file on a folder the machines share, no server) "
                                                  "to share the study between machines; default: sqlite in "
                                                  "out_dir/study.db")
    pruner: PrunerConfig = PrunerConfig()
    heartbeat_s: int = Field(60, ge=1, description="a running trial records a heartbeat this often; one silent for 2 "
                                                   "heartbeats (its process was killed) is marked failed by the next "
                                                   "trial")


def check_search(base: "RunConfig", search: dict[str, SearchRange], where: str = "search") -> None:
    """Every searched value makes a valid run of `base`'s method (a ConfigError that names the key)."""
    for key, rng in search.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "method" and parts[1] in METHODS.names() and parts[1] != base.method.name:
            raise ConfigError(f"{where} key {key!r} is a setting of method {parts[1]!r}, but base.method.name is "
                              f"{base.method.name!r}: it would change nothing")
        for value in rng.values():
            try:
                type(base).model_validate(apply_overrides(base.model_dump(), dotted({key: value})))
            except (ValidationError, ConfigError) as e:
                detail = (format_errors(e, "", type(base)).split(":\n", 1)[-1].strip() if isinstance(e, ValidationError)
                          else str(e))
                raise ConfigError(f"{where} key {key!r} with value {value!r} does not make a valid run: "
                                  f"{detail}") from None


class RowConfig(Strict):
    """A row: a named set of overrides, e.g. {id: feed3, label: "FEED (3 teachers)", set: {method.name: feed}}.
    A plain string `cqd` in `rows:` means {id: cqd, set: {method.name: cqd}}.

    A tuned row takes more overrides from a `best.yaml` of `cqd tune` (`tuned:`, a path in which `{column}` is
    the column's id), applied after `set`; a row with a search space (`tune:`) is tuned per column by
    `cqd tune` on the grid config and reads `<out_dir>/tune/<column>/<id>/best.yaml`."""

    id: str = Field(pattern=_ID)
    label: str | None = Field(None, description="the row's name in table.md; default: the method's label")
    set: dict[str, Any] = {}
    tune: dict[str, SearchRange] = Field({}, description="keys `cqd tune` searches for this row, in each column")
    tuned: str | None = Field(None, description="a best.yaml whose keys this row's cells use "
                                                "({column}: the column's id); default for a row with `tune:`: "
                                                "<out_dir>/tune/{column}/<id>/best.yaml")


CELL_KEYS = ("name", "out_dir", "cache_dir", "seed")  # set by the grid for each cell: no row or column sets them


def distinct_seeds(seeds: list[int]) -> list[int]:
    """A list of seeds, none repeated (a repeated seed would train one run and report it as two)."""
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"seed {', '.join(map(str, twice))} is given twice ({seeds}): each seed is one run of each "
                         "cell, counted once in the mean and std; list each seed once")
    return seeds


def _row(item: Any) -> Any:
    return {"id": item, "set": {"method.name": item}} if isinstance(item, str) else item


class GridRobustness(Strict):
    """`robustness:` of a grid: after the table, the first seed's models of `rows` in `column` are swept by
    `cqd robustness` (the degradations of the base run's own `robustness:` section, default its sweep)."""

    column: str = Field(description="the column whose models are swept")
    rows: list[str] = Field(min_length=1, description="row ids; the first is mCE's baseline")


class GridConfig(Strict):
    """A table: rows (named override sets, usually methods) x columns (degradations/views) x seeds,
    sharing one base run. A cell is (column id, row id, seed)."""

    name: str = "table"
    out_dir: str = "runs/table"
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field([0], min_length=1)
    rows: list[RowConfig] = [RowConfig(id=m, set={"method.name": m}) for m in ("hq", "lq", "augment", "staged", "cqd")]
    columns: dict[Annotated[str, Field(pattern=_ID)], ColumnConfig]
    base: RunConfig = Field(None, description="the run every cell starts from (`cqd.engine.schema`)")
    reference: str | None = Field(None, description="text printed under the table (by `cqd table` and in table.md), "
                                                    "e.g. published numbers on other data, labelled as such; "
                                                    "default: the paper's Table 1, in table.md only")
    tune: StudySettings = Field(StudySettings(), description="the studies of the rows with `tune:` (one per row and "
                                                             "column, on the first seed), run by `cqd tune`")
    deploy: DeployConfig | None = Field(None, description="after the cells: export, size and latency of each row's "
                                                          "first-seed model, and each pair's distillation gain")
    robustness: GridRobustness | None = Field(None, description="after the cells: top-1 of some rows' first-seed "
                                                                "models under a sweep of degradations, and mCE")
    executor: ExecutorConfig = Field(ExecutorConfig(), description="where the cells (and the studies' trials) run: "
                                                                   "local, ray or slurm (`cqd table --executor`)")

    @field_validator("rows", mode="before")
    @classmethod
    def _plain_rows(cls, v: Any) -> Any:
        return [_row(item) for item in v] if isinstance(v, list) else v

    @field_validator("rows", "columns")
    @classmethod
    def _not_empty(cls, v: Any, info) -> Any:
        if not v:
            one, example = (("row", "rows: [lq, cqd]") if info.field_name == "rows"
                            else ("column", "columns: {lowres: {degradation: 'lowres:size=8'}}"))
            raise ValueError(f"empty; a grid needs at least one {one}, e.g. {example}")
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        return distinct_seeds(v)

    def cell(self, column: str, row: RowConfig | str, seed: int, tuned: dict[str, Any] | None = None) -> RunConfig:
        """The run config of one cell: base, then the column's overrides, then the row's, then its `tuned`
        values (dotted keys, from the row's best.yaml), then the seed."""
        row = row if isinstance(row, RowConfig) else next(r for r in self.rows if r.id == row)
        overrides = dotted({**self.columns[column].overrides(), **row.set, **(tuned or {})}) + [f"seed={seed}"]
        data = apply_overrides(self.base.model_dump(exclude_unset=False), overrides)
        return type(self.base).model_validate(data)

    @model_validator(mode="after")
    def _cells_valid(self) -> "GridConfig":
        """Every row x column makes a valid run config (checked now, not mid-table); ids are unique; no row or
        column sets what the grid sets for each cell."""
        for where, overrides in [*((f"row {r.id!r}", r.set) for r in self.rows),
                                 *((f"column {c!r}", col.set) for c, col in self.columns.items())]:
            own = [k for k in overrides if k.split(".")[0] in CELL_KEYS]
            if own:
                raise ValueError(f"{where}: set.{own[0]} cannot be set per cell: the grid gives each cell its "
                                 "name, out_dir and cache_dir (under the grid's out_dir) and its seed (from seeds:); "
                                 "remove it (a grid's own out_dir and seeds are top-level keys)")
        ids = [r.id for r in self.rows]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"row ids must be unique; given twice: {', '.join(twice)}")
        for column in self.columns:
            for row in self.rows:
                try:
                    cfg = self.cell(column, row, self.seeds[0])
                except (ValidationError, ConfigError) as e:
                    detail = (format_errors(e, "", type(self.base)).split(":\n", 1)[-1]
                              if isinstance(e, ValidationError) else str(e))
                    raise ValueError(f"row {row.id!r} in column {column!r} does not make a valid run:\n"
                                     f"{detail}") from None
                if row.tune:
                    if not cfg.data.val_fraction:
                        raise ConfigError(f"row {row.id!r} is tuned on a validation split, never on the test set: set "
                                          "base.data.val_fraction (e.g. 0.1)")
                    check_search(cfg, row.tune, f"row {row.id!r}: tune")
        unknown = [r for pair in (self.deploy.pairs if self.deploy else []) for r in pair if r not in ids]
        if unknown:
            raise ValueError(f"deploy.pairs names rows {', '.join(map(repr, unknown))} that the grid does not have "
                             f"(its rows: {', '.join(ids)})")
        self._robustness_valid(ids)
        for row in self.rows:
            if row.tune and row.tuned is None:
                row.tuned = str(Path(self.out_dir) / "tune" / "{column}" / row.id / "best.yaml")
        return self


    def _robustness_valid(self, ids: list[str]) -> None:
        """`robustness:` names a column and rows of the grid, and its sweep fits the column's images."""
        r = self.robustness
        if r is None:
            return
        if r.column not in self.columns:
            raise ValueError(f"robustness.column {r.column!r} is not a column of the grid ({', '.join(self.columns)})")
        unknown = [row for row in r.rows if row not in ids]
        if unknown:
            raise ValueError(f"robustness.rows names rows {', '.join(map(repr, unknown))} that the grid does not "
                             f"have (its rows: {', '.join(ids)})")
        cfg = self.cell(r.column, r.rows[0], self.seeds[0])
        expand(cfg.robustness, cfg.data.image_size, cfg.data.degradation)


class TuneConfig(StudySettings):
    """A study of `cqd tune`: the base run, the searched keys (dotted, as overrides) and Optuna's settings.
    Each trial trains the base run with the drawn values; the study maximizes val top-1 on z."""

    name: str = "tune"
    out_dir: str = "runs/tune"
    base: RunConfig = Field(None, description="the run each trial trains with the drawn values")
    search: dict[str, SearchRange] = Field(min_length=1, description="dotted key -> range, e.g. "
                                                                     "method.cqd.lam: {low: 1, high: 300, log: true}")
    study_name: str | None = Field(None, description="default: name")
    executor: ExecutorConfig = Field(ExecutorConfig(), description="where the trials run: local, or workers on ray "
                                                                   "or slurm (`cqd tune --executor`)")

    @model_validator(mode="after")
    def _searchable(self) -> "TuneConfig":
        """The base holds validation items, and every searched value makes a valid run of the chosen method
        (a ConfigError, not a ValueError: pydantic would append the whole config to the message)."""
        if not self.base.data.val_fraction:
            raise ConfigError("tuning chooses on a validation split, never on the test set: set base.data.val_fraction "
                              "(e.g. 0.1)")
        if str(self.base.train.devices) != "1" or self.base.train.num_nodes != 1:
            raise ConfigError("a trial trains in the `cqd tune` process, on one device: keep base.train.devices and "
                              "num_nodes at 1 and start one `cqd tune` per device to share the study")
        check_search(self.base, self.search)
        return self


def load_grid_config(path: str | Path | dict, overrides: list[str] = ()) -> GridConfig:
    """A GridConfig from a YAML file, or from a dict (the Python API's way in), and `key=value` overrides."""
    return _load(GridConfig, path, overrides)


def load_tune_config(path: str | Path | dict, overrides: list[str] = ()) -> TuneConfig:
    """A TuneConfig from a YAML file or a dict, and `key=value` overrides."""
    return _load(TuneConfig, path, overrides)


def grid_config(data: dict) -> GridConfig:
    """A GridConfig from a dict (as a grid YAML would hold)."""
    return _load(GridConfig, data, [])


def tune_config(data: dict) -> TuneConfig:
    """A TuneConfig from a dict (as a tune YAML would hold)."""
    return _load(TuneConfig, data, [])


_SCHEMAS: dict[tuple, type] = {}


def with_base(model: type[GridConfig] | type[TuneConfig], data: Any) -> type:
    """`model` whose `base:` is the run schema of the base's task (plugins imported first)."""
    base = data.get("base") if isinstance(data, dict) else None
    schema = schema_of(base if isinstance(base, dict) else {})
    key = (model, schema)
    if key not in _SCHEMAS:
        _SCHEMAS[key] = create_model(model.__name__, __base__=model, __module__=__name__,
                                     base=(schema, Field(default_factory=schema,
                                                         description=model.model_fields["base"].description)))
    return _SCHEMAS[key]


def _load(model, path, overrides):
    overrides = list(overrides) if isinstance(overrides, (list, tuple)) else overrides
    data = apply_overrides(executor_section(path if isinstance(path, dict) else load_yaml(path)), overrides)
    return validate(with_base(model, data), data, "(dict)" if isinstance(path, dict) else str(path), overrides)
