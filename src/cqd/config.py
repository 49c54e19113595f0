"""Run and grid configs: plain YAML data, validated by a schema (unknown keys are errors).

Data flows one way: YAML + `key=value` overrides -> RunConfig -> engine. Configs are loaded
with `yaml.safe_load`, so a tag like `!!python/object` is rejected, never executed.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cqd.errors import ConfigError, CQDError


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
    seed: int = Field(0, description="seeds the degraded twins (fixed across runs and methods)")
    on_corrupt: Literal["error", "skip"] = "error"
    num_workers: int = Field(0, ge=0)

    @field_validator("degradation", "hq_degradation")
    @classmethod
    def _spec(cls, v: str) -> str:
        from cqd.degradations import parse_degradation

        try:
            parse_degradation(v)
        except CQDError as e:
            raise ValueError(str(e)) from None
        return v


class TeacherConfig(_Strict):
    model: str | None = Field(None, description="f's architecture; default: the student's")
    checkpoint: str | None = Field(None, description="model.pt of a finished 'hq' run; trained first if unset")
    pretrained: bool | str = False


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

        try:
            METHODS.get(v)
        except CQDError as e:
            raise ValueError(str(e)) from None
        return v


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0)
    lr_final_ratio: float = Field(0.1, gt=0, le=1, description="lr decays linearly to lr * this (paper: 0.1)")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"] = Field(
        "auto", description="auto: bf16-mixed on CUDA, 32-true on CPU (bf16 was 10x slower on an AVX2 CPU)")
    channels_last: bool = True
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    eval_every: int = Field(0, ge=0, description="evaluate every N epochs (0: only at the end)")
    max_steps_per_epoch: int | None = Field(None, ge=1)
    progress: bool = True


class RunConfig(_Strict):
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs/run"
    cache_dir: str = "runs/cache"
    model: str = "resnet8"
    pretrained: bool | str = False
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()


class ColumnConfig(_Strict):
    degradation: str
    hq_view: Literal["full", "crop"] = "full"
    lq_view: Literal["full", "crop"] = "full"


class GridConfig(_Strict):
    """A table: rows (methods) x columns (degradations/views) x seeds, sharing one base run."""

    name: str = "table"
    out_dir: str = "runs/table"
    seeds: list[int] = Field([0], min_length=1)
    rows: list[str] = ["hq", "lq", "augment", "staged", "cqd"]
    columns: dict[str, ColumnConfig]
    base: RunConfig = RunConfig()


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid config {source}:\n" + "\n".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (configs ship in the repo's configs/ folder)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid plain YAML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` sets data['a']['b']; the value is read as YAML (so 3, 0.5, true, null work)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key or any(not k for k in key.split(".")):
            raise ConfigError(f"override {item!r} should look like key=value, e.g. method.lam=50")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = data
        *parents, last = key.split(".")
        for k in parents:
            if not isinstance(node.get(k, {}), dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
            node = node.setdefault(k, {})
        node[last] = value
    return data


def _validate(model: type[BaseModel], data: dict[str, Any], source: str):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    data = load_yaml(path) if path else {}
    return _validate(RunConfig, apply_overrides(data, list(overrides)), str(path or "(defaults)"))


def load_grid_config(path: str | Path, overrides: list[str] = ()) -> GridConfig:
    return _validate(GridConfig, apply_overrides(load_yaml(path), list(overrides)), str(path))


def run_config(data: dict[str, Any] | RunConfig) -> RunConfig:
    """A RunConfig from a dict (the Python API's way in) with the same validation as files."""
    return data if isinstance(data, RunConfig) else _validate(RunConfig, data, "(dict)")
