"""A run's config: the `train:` and teacher sections, and the run schema of a task, built from the registries.

`run_schema(task)` is `RunConfig` with the `method:` section of the methods registered now and the task's own
section (e.g. `sr:`), built when first asked for (a plugin's method or task gets its section too).
`run_config` and `load_run_config` are the ways in: a dict or a YAML file, `key=value` overrides, and
the `plugins:` it names imported first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from cqd import plugins
from cqd.compress.schema import CompressConfig
from cqd.config import apply_overrides, load_yaml, short, validate
from cqd.data.schema import DataConfig
from cqd.degradations import check_spec
from cqd.degradations.sweep import SweepConfig
from cqd.errors import ConfigError
from cqd.methods import METHODS
from cqd.methods.schema import method_schema
from cqd.models.factory import check_model_name
from cqd.schema import MAX_SEED, Strict
from cqd.tasks import TASKS


class TeacherConfig(Strict):
    """One frozen teacher f. Unset fields follow the run: its model, seed, x view and x degradation."""

    model: str | None = Field(None, description="f's architecture; default: the student's")
    checkpoint: str | None = Field(None, description="model.pt of a finished 'hq' run; trained first if unset")
    pretrained: bool | str = False
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed f is trained with when it is trained here; "
                                                                  "default: the run's")
    view: Literal["full", "crop"] | None = Field(None, description="f's input view; default: data.hq_view")
    degradation: str | None = Field(None, description="degradation of f's input (e.g. a teacher of blurred images); "
                                                      "default: data.hq_degradation")
    train_subset: int | Literal["all"] | None = Field(
        None, description="the items f is trained on when it is trained here: the first N of the train split's fixed "
                          "shuffle, or all; the run's validation items are always left out (a privileged teacher "
                          "that sees more items than the student); default: the run's items")
    epochs: int | None = Field(None, ge=1, description="f's epochs when it is trained here; default: train.epochs")
    calibrate: bool = Field(False, description="fit one temperature T_cal to f's logits on the validation split "
                                               "(NLL, as Guo et al. 2017) and distil from f(x) / T_cal; needs "
                                               "data.val_fraction > 0")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        return v if v is None else check_model_name(v)

    @field_validator("degradation")
    @classmethod
    def _spec(cls, v: str | None) -> str | None:
        return check_spec(v)


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("linear", "cosine", "constant")


class PhaseConfig(Strict):
    """Optimizer settings of one named phase of a method (e.g. `adversary`); unset keys come from the
    method's defaults for that phase, then from `train:`."""

    optimizer: Literal[OPTIMIZERS] | None = None
    lr: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    betas: tuple[float, float] | None = None
    weight_decay: float | None = Field(None, ge=0)
    schedule: Literal[SCHEDULES] | None = None
    lr_final_ratio: float | None = Field(None, gt=0, le=1)


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal[OPTIMIZERS] = Field("sgd", description="the main phase's optimizer "
                                                              "(the paper: SGD with momentum)")
    lr: float = Field(0.05, gt=0)
    schedule: Literal[SCHEDULES] = Field("linear", description="linear (the paper): lr decays linearly to "
                                                               "lr * lr_final_ratio")
    lr_final_ratio: float = Field(0.1, gt=0, le=1, description="lr decays to lr * this (paper: 0.1)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/AdamW betas")
    weight_decay: float = Field(5e-4, ge=0)
    phases: dict[str, PhaseConfig] = Field({}, description="per-phase optimizer settings of multi-phase methods, "
                                                           "by phase name")
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
    check_every: int = Field(50, ge=1, description="read the device's loss sums, non-finite flags and (under DDP) the "
                                                   "stop flag every N steps, not every step (no wait on the device "
                                                   "in between); also at each epoch's end and before each checkpoint")
    feature_cache_mb: int = Field(1024, ge=0, description="teachers' feature maps are computed once and kept on the "
                                                          "device when x is fixed and they fit in this many MB")
    progress: bool = True


class RunConfig(Strict):
    name: str = "run"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    out_dir: str = "runs/run"
    cache_dir: str = "runs/cache"
    plugins: list[str] = Field([], description="modules imported before the registries are read: tasks, methods, "
                                              "models, degradations or datasets from outside the package")
    task: str = Field("classification", description="a registered task: classification (the paper's) or sr "
                                                    "(super-resolution: image-to-image, PSNR/SSIM; settings in `sr:`)")
    model: str = "resnet8"
    pretrained: bool | str = False
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = Field(TeacherConfig(), description="the one teacher f (a one-item `teachers` list)")
    teachers: list[TeacherConfig] = Field([], description="several teachers; use this or `teacher`, not both")
    method: Any = Field(None, description="the method and its sections (`cqd.methods.schema`)")
    train: TrainConfig = TrainConfig()
    compress: CompressConfig = Field(CompressConfig(), description="prune and/or quantization-aware training of g")
    robustness: SweepConfig | None = Field(None, description="the degradations and severities `cqd robustness` "
                                                             "sweeps (`cqd.degradations.sweep`); default: its sweep")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_name(v)

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return TASKS.check(v)

    @model_validator(mode="before")
    @classmethod
    def _task_sections(cls, data: Any) -> Any:
        """Another task's section is an error that says so (the schema of a run holds its own task's only)."""
        if isinstance(data, dict):
            task = data.get("task", "classification")
            for name in TASKS.names():
                if name != task and name in data and name not in cls.model_fields:
                    raise ValueError(f"`{name}:` is the section of task {name!r}, but this run's task is {task!r}: "
                                     f"set task: {name}, or remove the section")
        return data

    @model_validator(mode="before")
    @classmethod
    def _ensemble_teachers(cls, data: Any) -> Any:
        """An ensemble method (ens, feed) with `teachers: []` and no `teacher:` would distill from one default
        teacher trained for it: an error. (A config that omits `teachers`, or gives `teacher:`, has its one teacher;
        a dumped config holds both keys, so it never trips this.)"""
        if isinstance(data, dict) and data.get("teachers") == [] and "teacher" not in data:
            method = data.get("method")
            name = method.get("name") if isinstance(method, dict) else None
            if isinstance(name, str) and name in METHODS and METHODS.get(name).ensemble:
                raise ConfigError(f"teachers is empty, but method {name!r} distills from the `teachers` list: list "
                                  "them (e.g. teachers=[{model: resnet14}, {model: wrn_16_2}]), or drop `teachers` "
                                  "to distill from the one `teacher`")
        return data

    @model_validator(mode="after")
    def _compressible(self) -> "RunConfig":
        task = TASKS.get(self.task)
        if self.compress.active and not task.compressible:  # e.g. Taylor importance is written for class logits
            raise ConfigError(f"compress: is for classifiers; this run's task is {self.task!r}; "
                              "remove the compress section")
        return self

    @model_validator(mode="after")
    def _calibration(self) -> "RunConfig":
        """A calibrated teacher needs held-out items and class logits (a ConfigError: pydantic would append the
        whole config to a ValueError's message)."""
        keys = [f"teachers[{k}]" if self.teachers else "teacher" for k, t in enumerate(self.teacher_list)
                if t.calibrate]
        if keys and not TASKS.get(self.task).teacher_logits:
            raise ConfigError(f"{keys[0]}.calibrate fits a temperature to class logits; task {self.task!r}'s "
                              "teacher gives none: remove it")
        if keys and not self.data.val_fraction:
            raise ConfigError(f"{keys[0]}.calibrate fits its temperature on the validation split, but "
                              "data.val_fraction is 0: hold some training items out (e.g. data.val_fraction=0.1)")
        return self

    @model_validator(mode="after")
    def _one_teacher_key(self) -> "RunConfig":
        if self.teachers and self.teacher != TeacherConfig():
            raise ValueError("give the teachers either as `teacher:` (one) or as `teachers:` (a list), not both")
        return self

    @model_validator(mode="after")
    def _mix_size(self) -> "RunConfig":
        """A method conditioned on the mix (`mix_conditioned`) needs data.mix; its `k` (K) follows the mix.
        (A ConfigError, not a ValueError: pydantic would append the whole config to the message.)"""
        if not METHODS.get(self.method.name).mix_conditioned:
            return self
        p, mix = self.method.params, self.data.mix
        if mix is None:
            raise ConfigError(f"method {self.method.name!r} is conditioned on the mix c of K degradations: "
                              "set data.mix, "
                              "e.g. data.mix.degradations=[lowres:size=8,blur:sigma=1.5,noise:std=0.2,jpeg:quality=10]")
        if p.k is None:
            p.k = len(mix.degradations)
        elif p.k != len(mix.degradations):
            raise ConfigError(f"method.{self.method.name}.k={p.k} but data.mix has {len(mix.degradations)} "
                              "degradations; leave k unset (null) to follow the mix")
        return self

    @property
    def teacher_list(self) -> list[TeacherConfig]:
        """The teachers, in order: `teachers`, or the single `teacher` section."""
        return list(self.teachers) or [self.teacher]


_SCHEMAS: dict[tuple, type[RunConfig]] = {}


def run_schema(task: str = "classification") -> type[RunConfig]:
    """RunConfig with the `method:` section of the methods registered now and `task`'s own section."""
    key = (task, tuple(METHODS.names()), tuple(TASKS.names()))
    if key not in _SCHEMAS:
        methods = method_schema()
        fields: dict[str, Any] = {"method": (methods, Field(default_factory=methods))}
        section = TASKS.get(task).Config if task in TASKS else None
        if section is not None:
            fields[task] = (section, Field(default_factory=section, description=f"settings of task {task}"))
        _SCHEMAS[key] = create_model("RunConfig", __base__=RunConfig, __module__=__name__, **fields)
    return _SCHEMAS[key]


def schema_of(data: Any) -> type[RunConfig]:
    """The run schema of a config dict: its plugins imported first, then its task's schema (an unknown task
    validates against classification's, whose `task` check names the known ones)."""
    data = data if isinstance(data, dict) else {}
    plugins.load(data.get("plugins") or [])
    task = data.get("task", "classification")
    return run_schema(task if isinstance(task, str) and task in TASKS else "classification")


def run_config(data: dict[str, Any] | RunConfig, overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from a dict (the Python API's way in) with the same validation as files."""
    if isinstance(data, RunConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a dict, a RunConfig or a YAML file name, "
                          f"got {type(data).__name__} {short(data)}")
    return validate(schema_of(data), data, "(dict)", overrides)


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    overrides = list(overrides) if isinstance(overrides, (list, tuple)) else overrides
    data = apply_overrides(load_yaml(path) if path is not None and path != "" else {}, overrides)
    return validate(schema_of(data), data, str(path or "(defaults)"), overrides)
