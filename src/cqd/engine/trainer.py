"""One training loop for every method (Lightning Fabric does devices, precision and DDP).

config -> datasets -> PairMaker -> Method -> named losses -> this loop -> metrics, checkpoints.
The loop only sums the method's losses; it never asks which method it is running.
"""
from __future__ import annotations

import csv
import hashlib
import inspect
import io
import logging
import math
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader, Sampler, Subset
from torch.utils.data._utils.collate import default_collate
from torchmetrics.classification import MulticlassAccuracy
from tqdm import tqdm

from cqd.config import RunConfig, run_config
from cqd.data import DATASETS
from cqd.data.paired import PairMaker
from cqd.engine.checkpoint import load_model_file, load_resume_checkpoint, load_state, save_checkpoint, save_json, save_text
from cqd.engine.teacher_cache import cache_key, cached_teacher_logits, compute_logits
from cqd.errors import CheckpointError, ConfigError, TrainingDiverged
from cqd.methods import METHODS
from cqd.methods.base import freeze
from cqd.models import create_model

CKPT, MODEL, RESULT, METRICS = "last.ckpt", "model.pt", "result.json", "metrics.csv"


class EpochSampler(Sampler[int]):
    """Shuffled order fixed by (seed, epoch), sharded over ranks, able to start mid-epoch (resume).

    `pad=True` (training) repeats the first items so every rank gets the same number of steps;
    `pad=False` (evaluation) gives each item to exactly one rank, so none is counted twice.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True, pad: bool = True):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world) if pad else len(range(rank, n, world))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = torch.arange(self.n)
        order = torch.cat([order, order[: max(self.per_rank * self.world - self.n, 0)]])
        return iter(order[self.rank :: self.world][self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it bf16 is emulated, and slow."""
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def make_fabric(t, devices=None) -> Fabric:
    """Fabric for the configured accelerator. Precision `auto`: bf16-mixed on CUDA (16-mixed where it
    lacks bf16) and on CPUs with native bf16; fp32 on other CPUs (bf16 autocast there was ~10x slower) and MPS."""
    precision = t.precision
    if precision == "auto":
        cuda = t.accelerator in ("cuda", "gpu") or (t.accelerator == "auto" and torch.cuda.is_available())
        cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not cuda and not torch.backends.mps.is_available())
        if cuda:
            precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        else:
            precision = "bf16-mixed" if cpu and cpu_has_bf16() else "32-true"
    quiet = [logging.getLogger(n) for n in ("lightning.fabric", "lightning.pytorch")]  # its "Using bfloat16 AMP" lines
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        return Fabric(accelerator=t.accelerator, devices=devices or t.devices,
                      strategy="auto" if devices else t.strategy, precision=precision)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def build_datasets(cfg: RunConfig):
    """(train, test, base_train, base_test): subsets are a fixed shuffle (seed 0) so every run sees the same items."""
    d = cfg.data
    builder = DATASETS.get(d.name)
    out = []
    for split, n in (("train", d.train_subset), ("test", d.test_subset)):
        ds = builder(d.root, split, d.image_size, on_corrupt=d.on_corrupt)
        sub = ds if n is None or n >= len(ds) else Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist())
        out.append((sub, ds))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def make_loader(ds, base, batch_size: int, sampler: Sampler, num_workers: int, drop_last: bool) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                      collate_fn=getattr(base, "collate", default_collate), persistent_workers=num_workers > 0)


def make_maker(cfg: RunConfig, base) -> PairMaker:
    maker = PairMaker(cfg.data.degradation, cfg.data.hq_view, cfg.data.lq_view, cfg.data.hq_degradation,
                      seed=cfg.data.seed, fresh_each_epoch=cfg.data.fresh_each_epoch,
                      mean=getattr(base, "mean", (0.485, 0.456, 0.406)), std=getattr(base, "std", (0.229, 0.224, 0.225)),
                      channels_last=cfg.train.channels_last)
    maker.prepare(base)
    return maker


def build_model(name: str, num_classes: int, in_chans: int, pretrained, channels_last: bool):
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def load_model(path: str | Path, num_classes: int | None = None, in_chans: int | None = None):
    """A model saved by a finished run (`model.pt`): rebuilt from its own config, checked against the data."""
    ck = load_model_file(path)
    if num_classes is not None and ck["num_classes"] != num_classes:
        raise CheckpointError(f"{path} was trained for {ck['num_classes']} classes but this dataset has {num_classes}")
    if in_chans is not None and ck["in_chans"] != in_chans:
        raise CheckpointError(f"{path} takes {ck['in_chans']}-channel images but this dataset has {in_chans} channels")
    model = create_model(ck["model_name"], num_classes=ck["num_classes"], in_chans=ck["in_chans"])
    load_state(model, ck["model"], path, f"weights of model {ck['model_name']!r}")
    return model, ck


@torch.no_grad()
def evaluate(model, loader, maker: PairMaker, fabric: Fabric, num_classes: int) -> dict[str, float]:
    """Top-1 on the high-quality views x and the low-quality views z of the test set."""
    was_training = model.training
    model.eval()
    acc = {v: MulticlassAccuracy(num_classes, average="micro").to(fabric.device) for v in ("hq", "lq")}
    for batch in loader:
        pair = maker(batch, fabric.device)
        with fabric.autocast():
            acc["hq"].update(model(pair.x).float().argmax(1), pair.y)
            acc["lq"].update(model(pair.z).float().argmax(1), pair.y)
    model.train(was_training)
    return {f"acc_{v}": float(m.compute()) for v, m in acc.items()}


class _StopRequest:
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM asks the loop to stop at the next step boundary.

    A KeyboardInterrupt raised by the default handler can land between `opt.step()` and the step
    counter, and the checkpoint then holds weights one step ahead of its `step_in_epoch` (a resumed
    run repeats that batch). Deferring to `check()` keeps the saved state consistent; a second
    signal stops at once.
    """

    def __init__(self):
        self.requested = False

    def handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("cqd: stopping after this step (signal again to stop now)", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


@contextmanager
def _stop_on_signal():
    stop = _StopRequest()
    old = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, stop.handler)
    except ValueError:  # not the main thread: signals stay as they are
        pass
    try:
        yield stop
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _sync_buffers(module: torch.nn.Module, fabric: Fabric) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats).

    DDP broadcasts buffers at the start of each forward, so after the last step the other ranks
    hold stats updated by their own last batch; evaluating with them disagrees with model.pt.
    """
    if fabric.world_size > 1:
        for b in module.buffers():
            torch.distributed.broadcast(b.data, src=0)


def _same_architecture(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return type(a) is type(b) and sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def _write_csv(history: list[dict], path: Path) -> None:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    save_text(buf.getvalue(), path)


def _teacher_for(cfg: RunConfig, num_classes: int, in_chans: int, log) -> tuple[torch.nn.Module, str]:
    """f from `teacher.checkpoint`, or trained now on A (method hq) into `<out_dir>/teacher`."""
    path = cfg.teacher.checkpoint
    if path is None:
        tcfg = cfg.model_copy(deep=True)
        tcfg.model = cfg.teacher.model or cfg.model
        tcfg.pretrained = cfg.teacher.pretrained
        tcfg.method = type(cfg.method)(name="hq")
        tcfg.out_dir = str(Path(cfg.out_dir) / "teacher")
        tcfg.name = f"{cfg.name}-teacher"
        path = Path(tcfg.out_dir) / MODEL
        if not path.is_file():
            log(f"no teacher.checkpoint given: training the teacher f (method hq) into {tcfg.out_dir}")
            train(tcfg, resume=True)
    model, _ = load_model(path, num_classes, in_chans)
    return model, str(path)


@contextmanager
def flush_denormals():
    """Flush denormal floats to zero while cqd computes: on the CPU they made small-net training
    10x slower. Restored to torch's default afterwards, so the caller's process is unchanged."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def train(cfg: RunConfig | dict, resume: bool = False, fabric: Fabric | None = None) -> dict:
    """Train one method as configured; returns the result dict also written to `<out_dir>/result.json`."""
    with flush_denormals():
        return _train(run_config(cfg), resume, fabric)


def _train(cfg: RunConfig, resume: bool, fabric: Fabric | None) -> dict:
    t = cfg.train
    if fabric is None:
        fabric = make_fabric(t)
        fabric.launch()
    log = fabric.print
    out = Path(cfg.out_dir)
    method_cls = METHODS.get(cfg.method.name)

    torch.manual_seed(cfg.seed)
    train_ds, test_ds, base_train, base_test = build_datasets(cfg)
    num_classes, in_chans = base_train.num_classes, base_train.in_chans
    maker = make_maker(cfg, base_train)
    test_maker = make_maker(cfg, base_test)

    teacher = teacher_path = None
    needs_teacher = method_cls.uses_teacher or cfg.method.init == "teacher" or method_cls.init_from_teacher == "always"
    if needs_teacher:
        teacher, teacher_path = _teacher_for(cfg, num_classes, in_chans, log)
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.model, num_classes, in_chans, cfg.pretrained, t.channels_last)
    if teacher is not None:
        same = _same_architecture(teacher, student)
        want = cfg.method.init == "teacher" or (cfg.method.init == "auto" and method_cls.init_from_teacher != "never")
        if want and not same:
            if method_cls.init_from_teacher == "always" or cfg.method.init == "teacher":
                raise ConfigError(f"method {cfg.method.name!r} starts the student from the teacher, so model "
                                  f"{cfg.model!r} must match the teacher's architecture; use method cqd for compression")
        elif want:
            student.load_state_dict(teacher.state_dict())
        teacher = freeze(teacher.to(fabric.device, memory_format=torch.channels_last if t.channels_last else torch.contiguous_format))

    params = {k: getattr(cfg.method, k) for k in inspect.signature(method_cls.__init__).parameters if k not in ("self", "student")}
    method = method_cls(student, **params)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    sampler = EpochSampler(len(train_ds), cfg.seed, fabric.global_rank, fabric.world_size)
    loader = make_loader(train_ds, base_train, t.batch_size, sampler, cfg.data.num_workers, drop_last=len(train_ds) > t.batch_size * fabric.world_size)
    steps_per_epoch = min(len(loader), t.max_steps_per_epoch or len(loader))
    total = steps_per_epoch * t.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - (1 - t.lr_final_ratio) * min(s, total) / total)
    model, opt = fabric.setup(method, opt)
    test_loader = fabric.setup_dataloaders(make_loader(test_ds, base_test, t.batch_size * 2, EpochSampler(len(test_ds), 0, fabric.global_rank, fabric.world_size, shuffle=False, pad=False), cfg.data.num_workers, False), use_distributed_sampler=False)

    all_loader = make_loader(train_ds, base_train, t.batch_size * 2, EpochSampler(len(train_ds), 0, shuffle=False), cfg.data.num_workers, False)
    twin_mb = len(train_ds) * in_chans * cfg.data.image_size ** 2 * 4 / 2**20
    if not cfg.data.fresh_each_epoch and maker.T.spec() != "none" and twin_mb <= cfg.data.twin_cache_mb:
        t_twins = time.perf_counter()
        n = maker.fix_twins(all_loader, fabric.device, len(base_train))
        log(f"degraded twins: made once for {n} items ({twin_mb:.0f} MB on {fabric.device}, {time.perf_counter() - t_twins:.1f}s)")

    soft_table = None
    if method_cls.uses_teacher and maker.teacher_input_fixed and t.cache_teacher:
        identity = {"dataset": cfg.data.name, "root": cfg.data.root, "split": "train", "size": cfg.data.image_size,
                    "n": len(base_train), "data_seed": cfg.data.seed, "precision": fabric.strategy.precision.precision}
        if isinstance(train_ds, Subset):  # f(x) only for the items this run trains on, not the whole split
            identity["items"] = hashlib.sha256(",".join(map(str, train_ds.indices)).encode()).hexdigest()[:16]
        key = cache_key(teacher, identity, maker.view_key())
        soft_table, hit = cached_teacher_logits(cfg.cache_dir, key, lambda: compute_logits(teacher, all_loader, maker, fabric.device, len(base_train), fabric.autocast))
        soft_table = soft_table.to(fabric.device)
        log(f"teacher soft targets: {'cache hit' if hit else 'computed and cached'} ({cfg.cache_dir}/teacher-{key}.pt)")

    start_epoch, start_step, history = 0, 0, []
    partial_sums, partial_n = {}, 0  # the interrupted epoch's loss sums, so its logged mean covers every step
    if resume and (out / CKPT).is_file():
        ck = load_resume_checkpoint(out / CKPT, cfg.model_dump())  # same model and settings, or a CheckpointError
        for what, target in (("model", student), ("optimizer", opt), ("scheduler", sched)):
            load_state(target, ck[what], out / CKPT, what)
        start_epoch, start_step, history = ck["epoch"], ck["step_in_epoch"], ck["history"][: ck["epoch"]]
        if start_step:
            # only rank 0's share was saved: the other ranks start the sums at zero (same keys, for all_reduce)
            partial_sums = {k: (v if fabric.is_global_zero else 0.0) for k, v in ck.get("epoch_sums", {}).items()}
            partial_n = ck.get("epoch_n", 0) if fabric.is_global_zero else 0
        log(f"resuming {out} at epoch {start_epoch} step {start_step}")

    def checkpoint(epoch: int, step: int, sums: dict | None = None, n: int = 0) -> None:
        if fabric.is_global_zero:
            save_checkpoint({"format": "cqd-checkpoint-v1", "model_name": cfg.model, "num_classes": num_classes,
                             "in_chans": in_chans, "model": student.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "epoch": epoch, "step_in_epoch": step,
                             "epoch_sums": {k: float(v) for k, v in (sums or {}).items()}, "epoch_n": n,
                             "history": history[:epoch], "config": cfg.model_dump()}, out / CKPT)
        fabric.barrier()

    writer = None
    if fabric.is_global_zero:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
        save_json(cfg.model_dump(), out / "config.json")
    t0, seen, step_time = time.perf_counter(), 0, 0.0
    # `at` is where a resumed run would continue; it is only advanced once a step's update, its loss
    # sums and its counter are all done, so an interrupt at any point saves a consistent checkpoint.
    at = {"epoch": start_epoch, "step": start_step, "sums": {}, "n": 0}
    consistent = True
    try:
        with _stop_on_signal() as stop:
            for epoch in range(start_epoch, t.epochs):
                resumed = epoch == start_epoch
                sampler.set_epoch(epoch, (start_step if resumed else 0) * t.batch_size)
                model.train()
                sums: dict[str, torch.Tensor] = {k: torch.tensor(v, device=fabric.device) for k, v in partial_sums.items()} if resumed else {}
                n_epoch, n_new, t_epoch = (partial_n if resumed else 0), 0, time.perf_counter()
                bar = tqdm(total=steps_per_epoch, initial=start_step if resumed else 0,
                           desc=f"{cfg.name} epoch {epoch + 1}/{t.epochs}", disable=not (t.progress and fabric.is_global_zero),
                           leave=False, dynamic_ncols=True)
                step = start_step if resumed else 0
                at.update(epoch=epoch, step=step, sums=dict(sums), n=n_epoch)
                for batch in loader:
                    stop.check()
                    if step >= steps_per_epoch:
                        break
                    pair = maker(batch, fabric.device, epoch)
                    soft = None
                    if method_cls.uses_teacher:
                        if soft_table is not None:
                            soft = soft_table[pair.index]
                        else:
                            with torch.no_grad(), fabric.autocast():
                                soft = teacher(pair.x).float()
                    _, losses = model(pair, soft)
                    loss = sum(losses.values())
                    if not torch.isfinite(loss):
                        bad = [k for k, v in losses.items() if not torch.isfinite(v)]
                        raise TrainingDiverged(
                            f"{cfg.name}: loss became {loss.item()} at epoch {epoch + 1} step {step + 1} "
                            f"(non-finite term: {', '.join(bad) or 'the sum'}). "
                            + (f"The last good checkpoint {out / CKPT} is kept; " if (out / CKPT).is_file()
                               else "No checkpoint was written yet; ")
                            + "lower train.lr or method.lam and start again (without --resume, or in a new out_dir).")
                    opt.zero_grad(set_to_none=True)
                    fabric.backward(loss)
                    consistent = False
                    opt.step()
                    sched.step()
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0) + v.detach() * len(pair)
                    n_epoch += len(pair)
                    n_new += len(pair)
                    step += 1
                    at.update(step=step, sums=dict(sums), n=n_epoch)
                    consistent = True
                    if bar.n % 10 == 0 or step == steps_per_epoch:
                        rate = n_new * fabric.world_size / (time.perf_counter() - t_epoch)
                        bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
                    bar.update(1)
                bar.close()
                dt = time.perf_counter() - t_epoch
                step_time += dt
                seen += n_new * fabric.world_size
                totals = fabric.all_reduce(torch.stack([*sums.values(), torch.tensor(float(n_epoch), device=fabric.device)]).float(), reduce_op="sum")
                row = {"epoch": epoch + 1, "lr": sched.get_last_lr()[0], "images_per_s": n_new * fabric.world_size / max(dt, 1e-9)}
                row.update({k: float(v / max(float(totals[-1]), 1)) for k, v in zip(sums, totals[:-1])})
                if (t.eval_every and (epoch + 1) % t.eval_every == 0) or epoch + 1 == t.epochs:
                    _sync_buffers(student, fabric)
                    row.update(evaluate(student, test_loader, test_maker, fabric, num_classes))
                history.append(row)
                start_step = 0
                checkpoint(epoch + 1, 0)
                at.update(epoch=epoch + 1, step=0, sums={}, n=0)
                if writer:
                    for k, v in row.items():
                        writer.add_scalar(k, v, epoch + 1)
                    _write_csv(history, out / METRICS)
                log(f"{cfg.name} epoch {epoch + 1}/{t.epochs}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
    except KeyboardInterrupt:
        if consistent:
            checkpoint(at["epoch"], at["step"], at["sums"], at["n"])
            log(f"interrupted: saved {out / CKPT} at epoch {at['epoch']} step {at['step']}; continue with --resume")
        else:  # a second Ctrl-C inside an optimizer step: the weights in memory are half-updated
            log(f"interrupted during an optimizer step: kept the last checkpoint {out / CKPT}; continue with --resume")
        raise
    finally:
        if writer:
            writer.close()

    final = history[-1] if history else {}
    result = {"name": cfg.name, "method": cfg.method.name, "model": cfg.model, "seed": cfg.seed,
              "degradation": cfg.data.degradation, "acc_hq": final.get("acc_hq"), "acc_lq": final.get("acc_lq"),
              "wall_s": time.perf_counter() - t0, "train_s": step_time,
              "images_per_s": seen / step_time if step_time else None, "teacher": teacher_path,
              "world_size": fabric.world_size, "precision": fabric.strategy.precision.precision, "history": history,
              "config": cfg.model_dump()}
    if fabric.is_global_zero:
        save_checkpoint({"model_name": cfg.model, "num_classes": num_classes, "in_chans": in_chans,
                         "model": student.state_dict(), "config": cfg.model_dump()}, out / MODEL)
        save_json(result, out / RESULT)
    fabric.barrier()
    return result
