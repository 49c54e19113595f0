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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from cqd.errors import ConfigError, CQDError


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
        if source not in ("tv", "timm"):
            raise ValueError(f"unknown model source {source!r} in {name!r}; use 'tv:NAME', 'timm:NAME' or a built-in name")
        return name
    from cqd.models.factory import MODELS

    try:
        MODELS.get(name)
    except CQDError as e:
        raise ValueError(f"{e} Torchvision and timm models are named 'tv:NAME' and 'timm:NAME'.") from None
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    name: str = "fashion_mnist"
    root: str | None = None
    image_size: int = Field(32, ge=8, le=2048)
    train_subset: int | None = Field(None, ge=1, description="use the first N of a fixed shuffle of the train split")
    test_subset: int | None = Field(None, ge=1)
    hq_view: Literal["full", "crop"] = "full"
    lq_view: Literal["full", "crop"] = "full"
    degradation: str = "lowres:size=8"
    hq_degradation: str = "none"
    fresh_each_epoch: bool = False
    twin_cache_mb: int = Field(1024, ge=0, description="fixed twins are made once and kept on the device when they fit in this many MB (0: made every step)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds the degraded twins (fixed across runs and methods)")
    on_corrupt: Literal["error", "skip"] = "error"
    num_workers: int = Field(0, ge=0)

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
    model: str | None = Field(None, description="f's architecture; default: the student's")
    checkpoint: str | None = Field(None, description="model.pt of a finished 'hq' run; trained first if unset")
    pretrained: bool | str = False

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        return v if v is None else _known_model(v)


class MethodConfig(_Strict):
    name: str = "cqd"
    T: float = Field(10.0, gt=0, description="temperature")
    lam: float = Field(50.0, ge=0, description="lambda, weight of the distillation term")
    loss: Literal["ce", "mse"] = "ce"
    scale: Literal["paper", "hinton"] = Field("paper", description="paper: lambda*CE_T; hinton: lambda*T^2*CE_T")
    init: Literal["auto", "teacher", "scratch"] = "auto"

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from cqd.methods import METHODS

        return _registered(METHODS, v)


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0)
    lr_final_ratio: float = Field(0.1, gt=0, le=1, description="lr decays linearly to lr * this (paper: 0.1)")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"] = Field(
        "auto", description="auto: bf16-mixed on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else 32-true")
    channels_last: bool = True
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    eval_every: int = Field(0, ge=0, description="evaluate every N epochs (0: only at the end)")
    max_steps_per_epoch: int | None = Field(None, ge=1)
    cache_teacher: bool = Field(True, description="compute f(x) once when x is fixed; false: f runs every step")
    progress: bool = True


class RunConfig(_Strict):
    name: str = "run"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    out_dir: str = "runs/run"
    cache_dir: str = "runs/cache"
    model: str = "resnet8"
    pretrained: bool | str = False
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return _known_model(v)


class ColumnConfig(_Strict):
    degradation: str
    hq_view: Literal["full", "crop"] = "full"
    lq_view: Literal["full", "crop"] = "full"

    @field_validator("degradation")
    @classmethod
    def _spec(cls, v: str) -> str:
        from cqd.degradations import parse_degradation

        try:
            parse_degradation(v)
        except CQDError as e:
            raise ValueError(str(e)) from None
        return v


class GridConfig(_Strict):
    """A table: rows (methods) x columns (degradations/views) x seeds, sharing one base run."""

    name: str = "table"
    out_dir: str = "runs/table"
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field([0], min_length=1)
    rows: list[str] = ["hq", "lq", "augment", "staged", "cqd"]
    columns: dict[str, ColumnConfig]
    base: RunConfig = RunConfig()

    @field_validator("rows")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        from cqd.methods import METHODS

        for name in v:
            _registered(METHODS, name)
        return v

    @model_validator(mode="after")
    def _columns_fit(self) -> "GridConfig":
        """Each column's degradation must fit base.data.image_size (checked now, not mid-table)."""
        from cqd.degradations import parse_degradation

        size = self.base.data.image_size
        for name, col in self.columns.items():
            try:
                parse_degradation(col.degradation).check(3, size)
            except CQDError as e:
                raise ValueError(f"columns.{name}.degradation does not fit base.data.image_size={size}: {e}") from None
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
            if not (isinstance(got, str) and got and got in msg):
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
    """`a.b=value` sets data['a']['b']; the value is read as YAML (so 3, 0.5, true, null work)."""
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
        node = data
        *parents, last = (k.strip() for k in key.split("."))
        for i, k in enumerate(parents):
            if not isinstance(node.get(k, {}), dict):
                section = ".".join(parents[: i + 1])
                raise ConfigError(f"override {item!r}: {section} is a value ({_short(node[k])}), not a section")
            node = node.setdefault(k, {})
        node[last] = value
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


def load_grid_config(path: str | Path, overrides: list[str] = ()) -> GridConfig:
    overrides = list(overrides) if isinstance(overrides, (list, tuple)) else overrides
    return _validate(GridConfig, apply_overrides(load_yaml(path), overrides), str(path), overrides)


def run_config(data: dict[str, Any] | RunConfig, overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from a dict (the Python API's way in) with the same validation as files."""
    if isinstance(data, RunConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a dict, a RunConfig or a YAML file name, got {type(data).__name__} {_short(data)}")
    return _validate(RunConfig, data, "(dict)", overrides)
