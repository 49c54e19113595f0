"""Run and grid configs: plain YAML data, validated by a schema (unknown keys are errors).

Data flows one way: YAML + `key=value` overrides -> RunConfig -> engine. Configs are loaded
with `yaml.safe_load`, so a tag like `!!python/object` is rejected, never executed.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

from cqd.errors import ConfigError, CQDError
from cqd.compress.schema import CompressConfig, DeployConfig
from cqd.methods import METHODS
from cqd.data.sr import SRConfig
from cqd.schema import Strict as _Strict


PRESETS = Path(__file__).parent / "configs"  # shipped configs; configs/ in the repo links here
MAX_SEED = 2**31 - 1  # seeds feed torch.manual_seed and int64 hashes (seed * 100003 + epoch must not overflow)


def _registered(registry, name: str) -> str:
    try:
        registry.get(name)
    except CQDError as e:
        raise ValueError(str(e)) from None
    return name


def _known_model(name: str) -> str:
    """A built-in model name is checked now; `tv:NAME` / `timm:NAME` when the model is built."""
    if ":" in name:
        source = name.partition(":")[0]
        if source not in ("tv", "timm") and ":" in name and _is_builtin_spec(name):
            return name
        if source not in ("tv", "timm"):
            raise ValueError(f"unknown model source {source!r} in {name!r}; use 'tv:NAME', 'timm:NAME' or a built-in name")
        return name
    from cqd.models.factory import MODELS

    try:
        MODELS.get(name)
    except CQDError as e:
        raise ValueError(f"{e} Torchvision and timm models are named 'tv:NAME' and 'timm:NAME'.") from None
    return name


def _is_builtin_spec(name: str) -> bool:
    """A built-in model with keys (`edsr:blocks=8,feats=32`): True when its keys are right, an error when not."""
    from cqd.models.factory import MODELS, builtin_spec

    if name.partition(":")[0] not in MODELS:
        return False
    try:
        builtin_spec(name)
    except CQDError as e:
        raise ValueError(str(e)) from None
    return True


class MixConfig(_Strict):
    """`data.mix`: z is the blend sum_k c_k T_k(x) of K degradations, c ~ Dirichlet(alpha) per sample and
    epoch (`cqd.data.blend`); it replaces data.degradation, and the Pair carries c."""

    degradations: list[str] = Field(min_length=2, description="the K degradation specs T_1..T_K")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration of the training mixes (SGN's 0.5: mostly near the corners)")
    c: list[float] | None = Field(None, description="one fixed mix for every sample (a test set at that c); default: drawn")

    @model_validator(mode="after")
    def _mixable(self) -> "MixConfig":
        from cqd.data.blend import check_mixable

        try:
            check_mixable(self.degradations)
        except CQDError as e:
            raise ValueError(str(e)) from None
        if self.c is not None and (len(self.c) != len(self.degradations) or min(self.c) < 0 or abs(sum(self.c) - 1) > 1e-4):
            raise ValueError(f"c={self.c} must be a point on the simplex with one weight per degradation "
                             f"({len(self.degradations)}): every weight >= 0, summing to 1")
        return self


class DataConfig(_Strict):
    name: str = "fashion_mnist"
    root: str | None = None
    image_size: int = Field(32, ge=8, le=2048)
    train_subset: int | None = Field(None, ge=1, description="use the first N of a fixed shuffle of the train split")
    test_subset: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.0, ge=0, lt=1, description="hold this share of the training items out as a validation "
                                "split (fixed by data.seed; runs then report val_acc_hq/val_acc_lq); 0: none")
    hq_view: Literal["full", "crop"] = "full"
    lq_view: Literal["full", "crop"] = "full"
    degradation: str = "lowres:size=8"
    hq_degradation: str = "none"
    fresh_each_epoch: bool = False
    twin_cache_mb: int = Field(1024, ge=0, description="fixed twins are made once and kept on the device when they fit in this many MB (0: made every step)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds the degraded twins (fixed across runs and methods)")
    on_corrupt: Literal["error", "skip"] = "error"
    num_workers: int = Field(0, ge=0)
    mix: MixConfig | None = Field(None, description="blend K degradations per sample (sym-parameter runs); replaces degradation")

    @field_validator("name")
    @classmethod
    def _dataset(cls, v: str) -> str:
        from cqd.data import DATASETS

        return _registered(DATASETS, v)

    @field_validator("degradation", "hq_degradation")
    @classmethod
    def _spec(cls, v: str, info: ValidationInfo) -> str:
        """A known spec, and one that fits data.image_size (e.g. lowres:size must not exceed it)."""
        from cqd.degradations import parse_degradation

        try:
            T = parse_degradation(v)
            size = info.data.get("image_size")
            if size is not None:
                T.check(3, size)  # the built-in checks depend on the image size only
        except CQDError as e:
            raise ValueError(str(e)) from None
        return v


class TeacherConfig(_Strict):
    """One frozen teacher f. Unset fields follow the run: its model, seed, x view and x degradation."""

    model: str | None = Field(None, description="f's architecture; default: the student's")
    checkpoint: str | None = Field(None, description="model.pt of a finished 'hq' run; trained first if unset")
    pretrained: bool | str = False
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed f is trained with when it is trained here; default: the run's")
    view: Literal["full", "crop"] | None = Field(None, description="f's input view; default: data.hq_view")
    degradation: str | None = Field(None, description="degradation of f's input (e.g. a teacher of blurred images); default: data.hq_degradation")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        return v if v is None else _known_model(v)

    @field_validator("degradation")
    @classmethod
    def _spec(cls, v: str | None) -> str | None:
        if v is not None:
            from cqd.degradations import parse_degradation

            try:
                parse_degradation(v)
            except CQDError as e:
                raise ValueError(str(e)) from None
        return v


# The keys that were flat under `method:` before each method got its own section (all were CQD's).
MOVED_METHOD_KEYS = {"T": "cqd", "lam": "cqd", "loss": "cqd", "scale": "cqd"}
_COMMON_METHOD_KEYS = ("name", "init")


class _MethodBase(_Strict):
    """`method.name` and `method.init` are common; each method's own keys live in a section named after
    it (`method: {name: cqd, cqd: {T: 10, lam: 50}, fitnet: {beta: 100}}`), so one base config can hold
    settings for several methods and only the chosen one's section is used."""

    name: str = "cqd"
    init: Literal["auto", "teacher", "scratch"] = Field(
        "auto", description="auto: g starts from f when the method asks for it and the architectures match")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, section in MOVED_METHOD_KEYS.items():
                if key in data:
                    raise ValueError(f"method.{key} moved to method.{section}.{key}: each method's own keys now live "
                                     f"in a section named after it, e.g. method: {{name: {section}, {section}: "
                                     f"{{{key}: {data[key]!r}}}}} or the override method.{section}.{key}={data[key]}")
        return data

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return _registered(METHODS, v)

    @property
    def params(self) -> BaseModel:
        """The chosen method's own section (its defaults for a method registered after cqd.config was
        imported, e.g. in a notebook or a test: the schema has no section for it)."""
        return getattr(self, self.name, None) or METHODS.get(self.name).Params()


def _method_config() -> type[_MethodBase]:
    """MethodConfig: the common keys plus one section per registered method, from its `Params` schema."""
    sections = {}
    for name in METHODS.names():
        if name in _COMMON_METHOD_KEYS or hasattr(BaseModel, name):
            raise ValueError(f"method name {name!r} clashes with a config key; register it under another name")
        params = METHODS.get(name).Params
        sections[name] = (params, Field(default_factory=params, description=f"settings of method {name}"))
    return create_model("MethodConfig", __base__=_MethodBase, __doc__=_MethodBase.__doc__, **sections)


MethodConfig = _method_config()


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("linear", "cosine", "constant")


class PhaseConfig(_Strict):
    """Optimizer settings of one named phase of a method (e.g. `adversary`); unset keys come from the
    method's defaults for that phase, then from `train:`."""

    optimizer: Literal[OPTIMIZERS] | None = None
    lr: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    betas: tuple[float, float] | None = None
    weight_decay: float | None = Field(None, ge=0)
    schedule: Literal[SCHEDULES] | None = None
    lr_final_ratio: float | None = Field(None, gt=0, le=1)


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal[OPTIMIZERS] = Field("sgd", description="the main phase's optimizer (the paper: SGD with momentum)")
    lr: float = Field(0.05, gt=0)
    schedule: Literal[SCHEDULES] = Field("linear", description="linear (the paper): lr decays linearly to lr * lr_final_ratio")
    lr_final_ratio: float = Field(0.1, gt=0, le=1, description="lr decays to lr * this (paper: 0.1)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/AdamW betas")
    weight_decay: float = Field(5e-4, ge=0)
    phases: dict[str, PhaseConfig] = Field({}, description="per-phase optimizer settings of multi-phase methods, by phase name")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"] = Field(
        "auto", description="auto: bf16-mixed on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else 32-true")
    channels_last: bool = True
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    devices: int | str = Field(1, description="devices per machine; under torchrun or SLURM: the launcher's")
    num_nodes: int = Field(1, ge=1, description="machines; under torchrun or SLURM: the launcher's")
    strategy: str = "auto"
    eval_every: int = Field(0, ge=0, description="evaluate every N epochs (0: only at the end)")
    max_steps_per_epoch: int | None = Field(None, ge=1)
    cache_teacher: bool = Field(True, description="compute f(x) once when x is fixed; false: f runs every step")
    feature_cache_mb: int = Field(1024, ge=0, description="teachers' feature maps are computed once and kept on the device when x is fixed and they fit in this many MB")
    progress: bool = True


class RunConfig(_Strict):
    name: str = "run"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    out_dir: str = "runs/run"
    cache_dir: str = "runs/cache"
    task: Literal["classification", "sr"] = Field("classification", description="classification (the paper's) or sr "
                                                   "(super-resolution: image-to-image, PSNR/SSIM; settings in `sr:`)")
    model: str = "resnet8"
    pretrained: bool | str = False
    data: DataConfig = DataConfig()
    sr: SRConfig = Field(SRConfig(), description="settings of task sr: scale, patches, images")
    teacher: TeacherConfig = Field(TeacherConfig(), description="the one teacher f (a one-item `teachers` list)")
    teachers: list[TeacherConfig] = Field([], description="several teachers; use this or `teacher`, not both")
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    compress: CompressConfig = Field(CompressConfig(), description="prune and/or quantization-aware training of g")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return _known_model(v)

    @model_validator(mode="after")
    def _one_teacher_key(self) -> "RunConfig":
        if self.teachers and self.teacher != TeacherConfig():
            raise ValueError("give the teachers either as `teacher:` (one) or as `teachers:` (a list), not both")
        return self

    @model_validator(mode="after")
    def _mix_size(self) -> "RunConfig":
        """A method conditioned on the mix (`mix_conditioned`) needs data.mix; its `k` (K) follows the mix.
        (A ConfigError, not a ValueError: pydantic would append the whole config to the message.)"""
        if not getattr(METHODS.get(self.method.name), "mix_conditioned", False):
            return self
        p, mix = self.method.params, self.data.mix
        if mix is None:
            raise ConfigError(f"method {self.method.name!r} is conditioned on the mix c of K degradations: set data.mix, "
                             "e.g. data.mix.degradations=[lowres:size=8,blur:sigma=1.5,noise:std=0.2,jpeg:quality=10]")
        if p.k is None:
            p.k = len(mix.degradations)
        elif p.k != len(mix.degradations):
            raise ConfigError(f"method.{self.method.name}.k={p.k} but data.mix has {len(mix.degradations)} degradations; "
                             "leave k unset (null) to follow the mix")
        return self

    @property
    def teacher_list(self) -> list[TeacherConfig]:
        """The teachers, in order: `teachers`, or the single `teacher` section."""
        return list(self.teachers) or [self.teacher]


_ID = r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$"  # ids name folders: no slashes or spaces


class ColumnConfig(_Strict):
    """A column: the degradation and views (as today), and optionally more overrides (`set`) and a label."""

    degradation: str | None = Field(None, description="sets data.degradation")
    hq_view: Literal["full", "crop"] = "full"
    lq_view: Literal["full", "crop"] = "full"
    label: str | None = None
    set: dict[str, Any] = Field({}, description="more overrides, `key: value` as on the command line")

    @field_validator("degradation")
    @classmethod
    def _spec(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from cqd.degradations import parse_degradation

        try:
            parse_degradation(v)
        except CQDError as e:
            raise ValueError(str(e)) from None
        return v

    def overrides(self) -> dict[str, Any]:
        base = {"data.hq_view": self.hq_view, "data.lq_view": self.lq_view}
        if self.degradation is not None:
            base["data.degradation"] = self.degradation
        return {**base, **self.set}


class SearchRange(_Strict):
    """How `cqd tune` draws one key: a range `{low, high}` (`log: true` for a log scale, `type: int` for whole
    numbers, `step` for a grid of values) or a list of `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    type: Literal["float", "int", "categorical"] | None = Field(None, description="default: categorical with choices, else float")
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


class PrunerConfig(_Strict):
    """Optuna's MedianPruner: a trial stops when its val top-1 on z falls below the median of earlier trials at that epoch."""

    n_startup_trials: int = Field(5, ge=0, description="trials that are never pruned, to build the median")
    n_warmup_steps: int = Field(0, ge=0, description="epochs of each trial that are never pruned")


class StudySettings(_Strict):
    """Optuna's settings of a study (of `cqd tune`, or of each row x column study of a grid's `tune:`)."""

    n_trials: int = Field(16, ge=1, description="finished trials (complete, pruned or failed) of the study in all, "
                                                 "whichever processes ran them")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds the TPE sampler")
    startup_trials: int = Field(10, ge=1, description="TPE's start-up trials, drawn at random before it models the "
                                                      "results (Optuna's default 10); a study of no more trials is random search")
    storage: str | None = Field(None, description="a database URL (e.g. postgresql://host/db) to share the study between "
                                                  "machines; default: sqlite in out_dir/study.db")
    pruner: PrunerConfig = PrunerConfig()
    heartbeat_s: int = Field(60, ge=1, description="a running trial records a heartbeat this often; one silent for 2 "
                                                   "heartbeats (its process was killed) is marked failed by the next trial")


def check_search(base: "RunConfig", search: dict[str, SearchRange], where: str = "search") -> None:
    """Every searched value makes a valid run of `base`'s method (a ConfigError that names the key)."""
    for key, rng in search.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "method" and parts[1] in METHODS.names() and parts[1] != base.method.name:
            raise ConfigError(f"{where} key {key!r} is a setting of method {parts[1]!r}, but base.method.name is "
                              f"{base.method.name!r}: it would change nothing")
        for value in rng.values():
            try:
                RunConfig.model_validate(apply_overrides(base.model_dump(), _dotted({key: value})))
            except (ValidationError, ConfigError) as e:
                detail = _format(e, "", RunConfig).split(":\n", 1)[-1].strip() if isinstance(e, ValidationError) else str(e)
                raise ConfigError(f"{where} key {key!r} with value {value!r} does not make a valid run: {detail}") from None


class RowConfig(_Strict):
    """A row: a named set of overrides, e.g. {id: feed3, label: "FEED (3 teachers)", set: {method.name: feed}}.
    A plain string `cqd` in `rows:` means {id: cqd, set: {method.name: cqd}}.

    A tuned row takes more overrides from a `best.yaml` of `cqd tune` (`tuned:`, a path in which `{column}` is
    the column's id), applied after `set`; a row with a search space (`tune:`) is tuned per column by
    `cqd tune` on the grid config and reads `<out_dir>/tune/<column>/<id>/best.yaml`."""

    id: str = Field(pattern=_ID)
    label: str | None = Field(None, description="the row's name in table.md; default: the method's label")
    set: dict[str, Any] = {}
    tune: dict[str, SearchRange] = Field({}, description="keys `cqd tune` searches for this row, in each column")
    tuned: str | None = Field(None, description="a best.yaml whose keys this row's cells use ({column}: the column's id); "
                                                "default for a row with `tune:`: <out_dir>/tune/{column}/<id>/best.yaml")


def _row(item: Any) -> Any:
    return {"id": item, "set": {"method.name": item}} if isinstance(item, str) else item


def _dotted(overrides: dict[str, Any]) -> list[str]:
    import json

    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


class GridConfig(_Strict):
    """A table: rows (named override sets, usually methods) x columns (degradations/views) x seeds,
    sharing one base run. A cell is (column id, row id, seed)."""

    name: str = "table"
    out_dir: str = "runs/table"
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field([0], min_length=1)
    rows: list[RowConfig] = [RowConfig(id=m, set={"method.name": m}) for m in ("hq", "lq", "augment", "staged", "cqd")]
    columns: dict[Annotated[str, Field(pattern=_ID)], ColumnConfig]
    base: RunConfig = RunConfig()
    reference: str | None = Field(None, description="text printed under the table (by `cqd table` and in table.md), "
                                                    "e.g. published numbers on other data, labelled as such; "
                                                    "default: the paper's Table 1, in table.md only")
    tune: StudySettings = Field(StudySettings(), description="the studies of the rows with `tune:` (one per row and "
                                                             "column, on the first seed), run by `cqd tune`")
    deploy: DeployConfig | None = Field(None, description="after the cells: export, size and latency of each row's "
                                                          "first-seed model, and each pair's distillation gain")

    @field_validator("rows", mode="before")
    @classmethod
    def _plain_rows(cls, v: Any) -> Any:
        return [_row(item) for item in v] if isinstance(v, list) else v

    def cell(self, column: str, row: RowConfig | str, seed: int, tuned: dict[str, Any] | None = None) -> RunConfig:
        """The run config of one cell: base, then the column's overrides, then the row's, then its `tuned`
        values (dotted keys, from the row's best.yaml), then the seed."""
        row = row if isinstance(row, RowConfig) else next(r for r in self.rows if r.id == row)
        overrides = _dotted({**self.columns[column].overrides(), **row.set, **(tuned or {})}) + [f"seed={seed}"]
        data = apply_overrides(self.base.model_dump(exclude_unset=False), overrides)
        return RunConfig.model_validate(data)

    @model_validator(mode="after")
    def _cells_valid(self) -> "GridConfig":
        """Every row x column makes a valid run config (checked now, not mid-table); ids are unique."""
        ids = [r.id for r in self.rows]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"row ids must be unique; given twice: {', '.join(twice)}")
        for column in self.columns:
            for row in self.rows:
                try:
                    cfg = self.cell(column, row, self.seeds[0])
                except (ValidationError, ConfigError) as e:
                    detail = _format(e, "", RunConfig).split(":\n", 1)[-1] if isinstance(e, ValidationError) else str(e)
                    raise ValueError(f"row {row.id!r} in column {column!r} does not make a valid run:\n{detail}") from None
                if row.tune:
                    if not cfg.data.val_fraction:
                        raise ConfigError(f"row {row.id!r} is tuned on a validation split, never on the test set: set "
                                          "base.data.val_fraction (e.g. 0.1)")
                    check_search(cfg, row.tune, f"row {row.id!r}: tune")
        unknown = [r for pair in (self.deploy.pairs if self.deploy else []) for r in pair if r not in ids]
        if unknown:
            raise ValueError(f"deploy.pairs names rows {', '.join(map(repr, unknown))} that the grid does not have "
                             f"(its rows: {', '.join(ids)})")
        for row in self.rows:
            if row.tune and row.tuned is None:
                row.tuned = str(Path(self.out_dir) / "tune" / "{column}" / row.id / "best.yaml")
        return self


_SHOW = 80


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The keys allowed in the section at `loc` (e.g. ('method',) -> MethodConfig's fields)."""
    cls: Any = model
    parts = list(loc)
    while parts:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(str(parts.pop(0)))
        if field is None:
            return None
        cls = field.annotation
        if typing.get_origin(cls) is dict:  # e.g. columns: {name: ColumnConfig}: skip the name
            cls = typing.get_args(cls)[1]
            if not parts:
                return None
            parts.pop(0)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return None


def _origin(key: str, overrides: list[str]) -> str:
    """' (from override 'k=v')' when an override set `key` or the section holding it."""
    for item in reversed(overrides):
        k = item.partition("=")[0]
        if key == k or key.startswith(k + ".") or k.startswith(key + "."):
            return f" (from override {item!r})"
    return ""


def _format(err: ValidationError, source: str, model: type[BaseModel] = None, overrides: list[str] = ()) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1]) if model is not None else None
            msg = "unknown key"
            if allowed:
                close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                where = ".".join(str(p) for p in loc[:-1]) or "the top level"
                msg += f"{hint} ({where} takes: {', '.join(allowed)})"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg = f"must be a section (a mapping of keys), got {type(e.get('input')).__name__} {_short(e.get('input'))}"
        else:
            msg = re.sub(r"^(Value|Assertion) error, ", "", e["msg"])
            got = e.get("input")
            if not (isinstance(got, str) and got and got in msg) and " moved to " not in msg:
                msg += f" (got {_short(got)})"
        label = f"{key}: " if loc else ""  # a whole-config check names its keys itself
        lines.append(f"  {label}{msg}{_origin(key, list(overrides)) if loc else ''}")
    return f"invalid config {source}:\n" + "\n".join(lines)


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only: a `!!python/...` tag is an error, never run) that also
    refuses a key given twice in one mapping, which safe_load would silently resolve to the last."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            try:
                key = self.construct_object(key_node, deep=True)
                hash(key)
            except (TypeError, yaml.YAMLError):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_error(p: Path, e: yaml.YAMLError) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    where = f"{p} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else str(p)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    tag = re.search(r"constructor for the tag '([^']*)'", problem)
    if tag:
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return ConfigError(f"config file {where}: the tag {name} is not allowed; configs are plain data "
                           "(numbers, strings, lists, mappings), and tags that would build Python objects "
                           "or run code are refused (nothing was run)")
    context = getattr(e, "context", None)
    return ConfigError(f"config file {where} is not valid YAML: {problem}" + (f" ({context})" if context else ""))


def presets() -> list[str]:
    """The config files shipped with cqd (the repo's configs/ folder is a link to them)."""
    return sorted(f.name for f in PRESETS.iterdir() if f.suffix == ".yaml")


def _resolve_config(p: Path) -> Path:
    """`p` itself, else (for a bare preset name or `configs/NAME.yaml` outside the repo) the shipped preset."""
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder; pass a YAML file, e.g. one of configs/{{{','.join(presets())}}}")
    if p.is_file():
        return p
    preset = PRESETS / (p.name if p.suffix else p.name + ".yaml")
    if p.parent in (Path("configs"), Path()) and preset.is_file():
        return preset
    raise ConfigError(f"config file {p} does not exist; the shipped presets are configs/{{{','.join(presets())}}}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"a config must be a YAML file name, a dict or a RunConfig, got {type(path).__name__} {_short(path)}")
    p = _resolve_config(Path(path))
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        raise _yaml_error(p, e) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text (is it a YAML file?)") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
    except RecursionError:
        raise ConfigError(f"config file {p} is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys (e.g. `method: {{name: cqd}}`), "
                          f"got a {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` sets data['a']['b']; the value is read as YAML (so 3, 0.5, true, null work). A key that
    holds dots itself, as a search space's `method.cqd.lam`, is matched whole: `search.method.cqd.lam.high=100`;
    in a mapping of such keys, a new key is the whole rest of the path: `search.train.lr={low: 0.01, high: 1}`."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys, got {type(data).__name__} {_short(data)}")
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, (list, tuple)):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got {_short(overrides)}")
    data = copy.deepcopy(data)
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"override {_short(item)} should be a 'key=value' string, e.g. 'method.lam=50'")
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key or any(not k.strip() for k in key.split(".")):
            raise ConfigError(f"override {item!r} should look like key=value, e.g. method.lam=50")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        node, parts, i = data, [k.strip() for k in key.split(".")], 0
        while True:
            # a key that itself holds dots (a search space's `method.cqd.lam`) is matched whole, longest first
            # and in a mapping of such keys a new key is the whole rest: `search.train.lr={low: 0.01, high: 1}`
            dotted = any(isinstance(n, str) and "." in n for n in node)
            j = next((j for j in range(len(parts), i + 1, -1) if ".".join(parts[i:j]) in node), len(parts) if dotted else i + 1)
            k = ".".join(parts[i:j])
            if j == len(parts):
                node[k] = value
                break
            if not isinstance(node.get(k, {}), dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:j])} is a value ({_short(node[k])}), not a section")
            node, i = node.setdefault(k, {}), j
    return data


def _validate(model: type[BaseModel], data: dict[str, Any], source: str, overrides: list[str] = ()):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source, model, overrides)) from None
    except RecursionError:
        raise ConfigError(f"invalid config {source}: nested too deeply (a YAML alias refers to itself?)") from None


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    overrides = list(overrides) if isinstance(overrides, (list, tuple)) else overrides
    data = load_yaml(path) if path is not None and path != "" else {}
    return _validate(RunConfig, apply_overrides(data, overrides), str(path or "(defaults)"), overrides)


def load_grid_config(path: str | Path | dict, overrides: list[str] = ()) -> GridConfig:
    """A GridConfig from a YAML file, or from a dict (the Python API's way in), and `key=value` overrides."""
    overrides = list(overrides) if isinstance(overrides, (list, tuple)) else overrides
    data = path if isinstance(path, dict) else load_yaml(path)
    return _validate(GridConfig, apply_overrides(data, overrides), "(dict)" if isinstance(path, dict) else str(path), overrides)


def run_config(data: dict[str, Any] | RunConfig, overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from a dict (the Python API's way in) with the same validation as files."""
    if isinstance(data, RunConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a dict, a RunConfig or a YAML file name, got {type(data).__name__} {_short(data)}")
    return _validate(RunConfig, data, "(dict)", overrides)


class TuneConfig(StudySettings):
    """A study of `cqd tune`: the base run, the searched keys (dotted, as overrides) and Optuna's settings.
    Each trial trains the base run with the drawn values; the study maximizes val top-1 on z."""

    name: str = "tune"
    out_dir: str = "runs/tune"
    base: RunConfig = RunConfig()
    search: dict[str, SearchRange] = Field(min_length=1, description="dotted key -> range, e.g. method.cqd.lam: {low: 1, high: 300, log: true}")
    study_name: str | None = Field(None, description="default: name")

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


def load_tune_config(path: str | Path | dict, overrides: list[str] = ()) -> TuneConfig:
    """A TuneConfig from a YAML file or a dict, and `key=value` overrides."""
    overrides = list(overrides) if isinstance(overrides, (list, tuple)) else overrides
    data = path if isinstance(path, dict) else load_yaml(path)
    return _validate(TuneConfig, apply_overrides(data, overrides), "(dict)" if isinstance(path, dict) else str(path), overrides)
