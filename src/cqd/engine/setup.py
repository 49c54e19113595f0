"""Everything a run trains with, built in the method lifecycle's order: task data and pair makers -> teachers
(trained first where they have no checkpoint) -> student g (started from f where asked) -> `on_student`
hooks (pruning) -> the method -> `transform_student` -> `on_method` hooks (QAT) -> loaders -> fixed twins ->
the teachers' cached outputs and the method's pretraining stage."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from lightning_fabric import Fabric

from cqd.compress.compressor import Compressor
from cqd.engine.hooks import Compression, Hooks, MetricsLog, ProgressBar
from cqd.engine.loaders import eval_loader, make_loader
from cqd.engine.model_files import build_model, input_meta, same_architecture
from cqd.engine.precision import fp32_for_qat, make_fabric
from cqd.engine.sampling import EpochSampler
from cqd.engine.schema import RunConfig
from cqd.engine.teachers import Teachers
from cqd.errors import ConfigError
from cqd.methods import METHODS
from cqd.tasks import Task, task_of


@dataclass
class Setup:
    cfg: RunConfig
    resume: bool
    fabric: Fabric
    log: Callable[[str], None]
    out: Path
    task: Task
    maker: Any = None  # the training pairs' maker
    test_maker: Any = None
    num_classes: int = 0
    in_chans: int = 0
    teachers: Teachers | None = None
    method: Any = None
    hooks: Hooks = field(default_factory=Hooks)
    sampler: EpochSampler | None = None
    loader: Any = None
    test_loader: Any = None
    val_loader: Any = None
    steps_per_epoch: int = 0
    total: int = 0
    meta: dict = field(default_factory=dict)  # how g's inputs are made (model.pt's classes, mean, std, image_size)


def build(cfg: RunConfig, resume: bool, fabric: Fabric | None, train: Callable) -> Setup:
    """The run's parts; `train` trains a teacher that has no checkpoint (a run of its own)."""
    cfg, precision_note = fp32_for_qat(cfg)
    method_cls = METHODS.get(cfg.method.name)
    fabric = _fabric(cfg, fabric, method_cls)
    s = Setup(cfg, resume, fabric, fabric.print, Path(cfg.out_dir), task_of(cfg))
    if precision_note:
        s.log(precision_note)
    torch.manual_seed(cfg.seed)
    train_ds, test_ds, base_train, base_test = s.task.build_datasets(cfg)
    s.num_classes = method_cls.num_outputs(base_train.num_classes, cfg.method.params)
    s.in_chans = base_train.in_chans
    s.maker, s.test_maker = s.task.make_maker(cfg, base_train), s.task.make_maker(cfg, base_test)
    s.meta = input_meta(base_train, s.maker, cfg.data.image_size)
    if method_cls.needs_teacher(cfg):
        s.teachers = Teachers(cfg, base_train, base_train.num_classes, s.in_chans, fabric, train, s.log)
    _method(s, method_cls, train_ds, base_train)
    _loaders(s, train_ds, test_ds, base_train, base_test)
    all_loader = eval_loader(cfg, train_ds, base_train)
    _fix_twins(s, method_cls, train_ds, all_loader, len(base_train))
    if s.teachers and method_cls.uses_teacher:
        s.teachers.calibrate(s.task.val_dataset(cfg, base_train), base_train, s.maker)
        s.teachers.cache(train_ds, base_train, all_loader, s.maker)
        s.teachers.pretrain(s.method, train_ds, base_train, all_loader, s.maker)
    if fabric.is_global_zero:
        s.hooks.append(MetricsLog(s.out))
    s.hooks.append(ProgressBar(cfg.train.progress and fabric.is_global_zero))
    return s


def _fabric(cfg: RunConfig, fabric: Fabric | None, method_cls) -> Fabric:
    if fabric is None:
        fabric = make_fabric(cfg.train, find_unused=method_cls.ddp_find_unused)
        fabric.launch()
    elif cfg.compress.qat and fabric.strategy.precision.precision != "32-true":
        raise ConfigError(f"compress.qat trains in fp32, but the given Fabric runs at precision "
                          f"{fabric.strategy.precision.precision}; pass one made with precision 32-true")
    return fabric


def _method(s: Setup, method_cls, train_ds, base_train) -> None:
    """g (started from f where asked), the compression hook, the method around g, then its taps on f."""
    cfg, fabric = s.cfg, s.fabric
    torch.manual_seed(cfg.seed)
    student = build_model(s.task.model_name(cfg, cfg.model), s.num_classes, s.in_chans, cfg.pretrained,
                          cfg.train.channels_last)
    _start_from_teacher(s, student, method_cls)
    student = student.to(fabric.device)
    sample = torch.zeros(2, s.in_chans, cfg.data.image_size, cfg.data.image_size, device=fabric.device)
    if cfg.compress.active:  # prune g before the method sizes its own parts to it
        s.hooks.append(Compression(Compressor(cfg, sample.shape[1:], _task_batches(s, train_ds, base_train), s.log)))
    s.hooks.call("on_student", None, student, sample)
    s.method = method_cls(student, cfg.method.params, s.teachers.models if s.teachers else (), sample)
    s.method.transform_student()
    s.hooks.call("on_method", None, s.method)
    if s.teachers:
        s.teachers.tap(s.method.teacher_taps)


def _start_from_teacher(s: Setup, student, method_cls) -> None:
    """g starts from f (the first teacher) where the method and `method.init` ask for it."""
    init, rule = s.cfg.method.init, method_cls.init_from_teacher
    if s.teachers is None or not (init == "teacher" or (init == "auto" and rule != "never")):
        return
    teacher = s.teachers.models[0]
    if same_architecture(teacher, student):
        student.load_state_dict(teacher.state_dict())
    elif rule == "always" or init == "teacher":
        raise ConfigError(f"method {s.cfg.method.name!r} starts the student from the teacher, so model "
                          f"{s.cfg.model!r} must match the teacher's architecture; use method cqd for compression")


def _task_batches(s: Setup, train_ds, base_train):
    """batches(n): the first n training batches as (z, y), in item order (pruning's Taylor importance,
    BatchNorm recalibration)."""
    def batches(n: int):
        loader = eval_loader(s.cfg, train_ds, base_train)
        for _, batch in zip(range(n), loader):
            pair = s.maker(batch, s.fabric.device)
            yield pair.z, pair.y
    return batches


def _loaders(s: Setup, train_ds, test_ds, base_train, base_test) -> None:
    cfg, fabric, t = s.cfg, s.fabric, s.cfg.train
    s.sampler = EpochSampler(len(train_ds), cfg.seed, fabric.global_rank, fabric.world_size)
    s.loader = make_loader(train_ds, base_train, t.batch_size, s.sampler, cfg.data.num_workers,
                           drop_last=len(train_ds) > t.batch_size * fabric.world_size)
    s.steps_per_epoch = min(len(s.loader), t.max_steps_per_epoch or len(s.loader))
    s.total = s.steps_per_epoch * t.epochs
    ranked = {"rank": fabric.global_rank, "world": fabric.world_size}
    s.test_loader = fabric.setup_dataloaders(eval_loader(cfg, test_ds, base_test, **ranked),
                                             use_distributed_sampler=False)
    val_ds = s.task.val_dataset(cfg, base_train)
    if val_ds is not None:
        s.val_loader = fabric.setup_dataloaders(eval_loader(cfg, val_ds, base_train, **ranked),
                                                use_distributed_sampler=False)


def _fix_twins(s: Setup, method_cls, train_ds, all_loader, size: int) -> None:
    """With fixed pairs the twins z are made once, before the first step (skipped by methods that never see z)."""
    d = s.cfg.data
    mb = len(train_ds) * s.in_chans * d.image_size ** 2 * 4 / 2**20 * getattr(s.maker, "k", 1)  # K twins of a mix
    fixed = s.task.fixes_twins and method_cls.uses_z and not d.fresh_each_epoch
    if fixed and s.maker.T.spec() != "none" and mb <= d.twin_cache_mb:
        t0 = time.perf_counter()
        n = s.maker.fix_twins(all_loader, s.fabric.device, size)
        s.log(f"degraded twins: made once for {n} items ({mb:.0f} MB on {s.fabric.device}, "
              f"{time.perf_counter() - t0:.1f}s)")
