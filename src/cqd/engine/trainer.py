"""One training loop for every method (Lightning Fabric does devices, precision and DDP).

config -> datasets -> PairMaker -> teachers -> Method -> named losses per phase -> this loop ->
metrics, checkpoints. The loop only sums a phase's losses and steps its optimizer; it never asks
which method it runs. Setup (`Run.__init__`) builds everything in the method lifecycle's order:
student (started from f where asked) -> method -> `transform_student` -> optimizers per phase.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
import warnings
from pathlib import Path

import torch
from lightning_fabric import Fabric

from cqd.compress.compressor import Compressor, fp32_for_qat
from cqd.compress.pruning import count_params
from cqd.config import RunConfig, run_config
from cqd.engine import phases
from cqd.engine.checkpoint import FORMAT, load_resume_checkpoint, load_state, save_checkpoint, save_json, save_text
from cqd.engine.loaders import eval_loader, make_loader, val_dataset
from cqd.engine.model_files import MODEL, build_model, same_architecture, save_model
from cqd.engine.precision import flush_denormals, make_fabric
from cqd.engine.rounds import rounds_of, train_rounds
from cqd.engine.sampling import EpochSampler
from cqd.engine.signals import stop_on_signal
from cqd.engine.tasks import task_of
from cqd.engine.teachers import Teachers, needs_teacher
from cqd.errors import CheckpointError, ConfigError, TrainingDiverged
from cqd.methods import METHODS, Step

CKPT, RESULT, METRICS = "last.ckpt", "result.json", "metrics.csv"


def train(cfg: RunConfig | dict, resume: bool = False, fabric: Fabric | None = None, on_epoch=None) -> dict:
    """Train one method as configured; returns the result dict also written to `<out_dir>/result.json`.

    `on_epoch(row)` is called after each epoch's checkpoint with that epoch's metrics (the row of
    metrics.csv); a true return value ends the run there (e.g. a tuner's pruning), as a finished run.
    """
    cfg = run_config(cfg)
    if rounds_of(cfg) > 1:  # sequential distillation: one run per round, each round's student the next one's teacher
        return train_rounds(cfg, train, resume, fabric, on_epoch)
    with flush_denormals():
        return Run(cfg, resume, fabric).fit(on_epoch)


class Run:
    """Everything one training run holds; `fit` is the loop."""

    def __init__(self, cfg: RunConfig, resume: bool, fabric: Fabric | None):
        cfg, precision_note = fp32_for_qat(cfg)
        self.cfg, t = cfg, cfg.train
        method_cls = METHODS.get(cfg.method.name)
        if fabric is None:
            fabric = make_fabric(t, find_unused=method_cls.ddp_find_unused)
            fabric.launch()
        elif cfg.compress.qat and fabric.strategy.precision.precision != "32-true":
            raise ConfigError(f"compress.qat trains in fp32, but the given Fabric runs at precision "
                              f"{fabric.strategy.precision.precision}; pass one made with precision 32-true")
        self.fabric, self.log, self.out = fabric, fabric.print, Path(cfg.out_dir)
        if precision_note:
            self.log(precision_note)

        torch.manual_seed(cfg.seed)
        self.task = task_of(cfg)  # classification or sr: datasets, pair maker, metrics
        self.train_ds, test_ds, base_train, base_test = self.task.build_datasets(cfg)
        self.num_classes, self.in_chans = method_cls.num_outputs(base_train.num_classes, cfg.method.params), base_train.in_chans
        self.maker, self.test_maker = self.task.make_maker(cfg, base_train), self.task.make_maker(cfg, base_test)

        self.teachers = (Teachers(cfg, base_train, base_train.num_classes, self.in_chans, fabric, train, self.log)
                         if needs_teacher(cfg) else None)
        torch.manual_seed(cfg.seed)
        student = build_model(self.task.model_name(cfg, cfg.model), self.num_classes, self.in_chans, cfg.pretrained, t.channels_last)
        self._start_from_teacher(student, method_cls)
        student = student.to(fabric.device)
        sample = torch.zeros(2, self.in_chans, cfg.data.image_size, cfg.data.image_size, device=fabric.device)
        self.compressor = None
        if cfg.compress.active:  # prune g before the method sizes its own parts to it
            self.compressor = Compressor(cfg, sample.shape[1:], self._task_batches(base_train), self.log)
            self.compressor.before_method(student, sample)
        self.method = method_cls(student, cfg.method.params,
                                 self.teachers.models if self.teachers else (), sample)
        self.method.transform_student()
        if self.compressor:
            self.compressor.after_method(self.method)
        if self.teachers:
            self.teachers.tap(self.method.teacher_taps)

        self.sampler = EpochSampler(len(self.train_ds), cfg.seed, fabric.global_rank, fabric.world_size)
        self.loader = make_loader(self.train_ds, base_train, t.batch_size, self.sampler, cfg.data.num_workers,
                                  drop_last=len(self.train_ds) > t.batch_size * fabric.world_size)
        self.steps_per_epoch = min(len(self.loader), t.max_steps_per_epoch or len(self.loader))
        self.total = self.steps_per_epoch * t.epochs
        self.test_loader = fabric.setup_dataloaders(eval_loader(cfg, test_ds, base_test, fabric.global_rank, fabric.world_size),
                                                    use_distributed_sampler=False)
        val_ds = val_dataset(cfg, base_train)
        self.val_loader = None if val_ds is None else fabric.setup_dataloaders(
            eval_loader(cfg, val_ds, base_train, fabric.global_rank, fabric.world_size), use_distributed_sampler=False)
        all_loader = eval_loader(cfg, self.train_ds, base_train)
        self._fix_twins(method_cls, all_loader, len(base_train))
        if self.teachers and method_cls.uses_teacher:
            self.teachers.cache(self.train_ds, base_train, all_loader, self.maker)
            self.teachers.pretrain(self.method, self.train_ds, base_train, all_loader, self.maker)
        self._restore(resume)

    def _start_from_teacher(self, student, method_cls) -> None:
        """g starts from f (the first teacher) where the method and `method.init` ask for it."""
        init, rule = self.cfg.method.init, method_cls.init_from_teacher
        if self.teachers is None or not (init == "teacher" or (init == "auto" and rule != "never")):
            return
        teacher = self.teachers.models[0]
        if same_architecture(teacher, student):
            student.load_state_dict(teacher.state_dict())
        elif rule == "always" or init == "teacher":
            raise ConfigError(f"method {self.cfg.method.name!r} starts the student from the teacher, so model "
                              f"{self.cfg.model!r} must match the teacher's architecture; use method cqd for compression")

    def _task_batches(self, base_train):
        """batches(n): the first n training batches as (z, y), in item order (pruning's Taylor importance, BatchNorm recalibration)."""
        def batches(n: int):
            loader = eval_loader(self.cfg, self.train_ds, base_train)
            for _, batch in zip(range(n), loader):
                pair = self.maker(batch, self.fabric.device)
                yield pair.z, pair.y
        return batches

    def _epoch_hooks(self, epoch: int) -> bool:
        """The method's end-of-epoch hook, then compression's; True when either changed the student."""
        changed = self.method.on_epoch_end(epoch)
        return bool(self.compressor and self.compressor.on_epoch_end(self.method, epoch)) or changed

    def _fix_twins(self, method_cls, all_loader, size: int) -> None:
        """With fixed pairs the twins z are made once, before the first step (skipped by methods that never see z)."""
        d = self.cfg.data
        mb = len(self.train_ds) * self.in_chans * d.image_size ** 2 * 4 / 2**20 * getattr(self.maker, "k", 1)  # K twins of a mix
        if self.task.fixes_twins and method_cls.uses_z and not d.fresh_each_epoch and self.maker.T.spec() != "none" and mb <= d.twin_cache_mb:
            t0 = time.perf_counter()
            n = self.maker.fix_twins(all_loader, self.fabric.device, size)
            self.log(f"degraded twins: made once for {n} items ({mb:.0f} MB on {self.fabric.device}, {time.perf_counter() - t0:.1f}s)")

    def _optimizers(self, offset: int = 0) -> None:
        """(Re)build each phase's optimizer and schedule and hand them, with the method, to Fabric."""
        built = phases.build(self.method.phases(), self.cfg.train, self.total, offset)
        self.scheds = {name: sched for name, (_, sched) in built.items()}
        model, *opts = self.fabric.setup(self.method, *(opt for opt, _ in built.values()))
        self.model, self.opts = model, dict(zip(built, opts))

    def _restore(self, resume: bool) -> None:
        """Optimizers for a new run, or the state of `last.ckpt` (the method's structural changes replayed first)."""
        self.start_epoch, self.start_step, self.history, self.partial = 0, 0, [], ({}, 0)
        ck = None
        if resume and (self.out / CKPT).is_file():
            ck = load_resume_checkpoint(self.out / CKPT, self.cfg.model_dump())  # same settings, or a CheckpointError
            self.start_epoch, self.start_step, self.history = ck["epoch"], ck["step_in_epoch"], ck["history"][: ck["epoch"]]
        offset = 0
        for epoch in range(self.start_epoch):
            if self._epoch_hooks(epoch):
                offset = (epoch + 1) * self.steps_per_epoch
        self._optimizers(offset)
        if ck is None:
            return
        path = self.out / CKPT
        load_state(self.method, ck["method"], path, "method state (student and the method's own parts)")
        for kind, have in (("optimizers", self.opts), ("schedulers", self.scheds)):
            if set(ck[kind]) != set(have):
                raise CheckpointError(f"{path} holds {kind} {sorted(ck[kind])} but this method has {sorted(have)}; "
                                      "use another out_dir or drop --resume")
            for name, target in have.items():
                load_state(target, ck[kind][name], path, f"{kind[:-1]} {name!r}")
        if self.start_step:  # the saved sums are all ranks': rank 0 takes them, the others start at zero (same keys, for all_reduce)
            zero = not self.fabric.is_global_zero
            self.partial = ({k: 0.0 if zero else v for k, v in ck.get("epoch_sums", {}).items()}, 0 if zero else ck.get("epoch_n", 0))
        self.log(f"resuming {self.out} at epoch {self.start_epoch} step {self.start_step}")

    def fit(self, on_epoch=None) -> dict:
        cfg, t, fabric = self.cfg, self.cfg.train, self.fabric
        self.writer = self._open_logs()
        self.t0, self.seen, self.train_s = time.perf_counter(), 0, 0.0
        # `at` is where a resumed run would continue; it advances only once a step's updates, loss sums and
        # counter are all done, so an interrupt at any point saves a consistent checkpoint.
        self.at = {"epoch": self.start_epoch, "step": self.start_step, "sums": {}, "n": 0}
        self.consistent, result = True, None
        try:
            with stop_on_signal() as stop:
                for epoch in range(self.start_epoch, t.epochs):
                    resumed = epoch == self.start_epoch
                    step = self.start_step if resumed else 0
                    self.sampler.set_epoch(epoch, step * t.batch_size)
                    self.model.train()
                    sums, n = self.partial if resumed else ({}, 0)
                    self.at.update(epoch=epoch, step=step, sums={k: torch.tensor(v, device=fabric.device) for k, v in sums.items()}, n=n)
                    self.epoch_t0, self.n_new = time.perf_counter(), 0
                    bar = self._bar(epoch, step)
                    for batch in self.loader:
                        stop.check(fabric)
                        if self.at["step"] >= self.steps_per_epoch:
                            break
                        loss = self._step(batch, epoch)
                        self._progress(bar, loss)
                    bar.close()
                    row = self._end_epoch(epoch)
                    if on_epoch is not None and on_epoch(row):
                        self.log(f"{cfg.name}: stopped after epoch {epoch + 1} by the per-epoch callback")
                        break
                result = self._finish()
                # a signal after the last step's check (during the last evaluation or the final save) is not
                # lost: the run is complete and saved, and the caller (a grid's next cell) stops here. Checked on
                # this rank alone (no collective after the run's last barrier): under torchrun, a rank that
                # stops here ends the others.
                if stop.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if result is not None:
                self.log(f"interrupted: {cfg.name} had finished and is saved in {self.out}; stopping as asked")
            elif self.consistent:
                self._checkpoint(self.at["epoch"], self.at["step"], self.at["sums"], self.at["n"])
                self.log(f"interrupted: saved {self.out / CKPT} at epoch {self.at['epoch']} step {self.at['step']}; continue with --resume")
            else:  # a second Ctrl-C inside an optimizer step: the weights in memory are half-updated
                self.log(f"interrupted during an optimizer step: kept the last checkpoint {self.out / CKPT}; continue with --resume")
            raise
        finally:
            if self.writer:
                self.writer.close()
        return result

    def _step(self, batch, epoch: int) -> torch.Tensor:
        """One batch: each phase's forward, loss, backward and optimizer step, in the method's order."""
        pair = self.maker(batch, self.fabric.device, epoch)
        logits, features = self.teachers(batch, pair, epoch) if self.teachers and self.method.uses_teacher else ([], [])
        step = Step(pair, logits, features, epoch, epoch * self.steps_per_epoch + self.at["step"], self.total)
        sums = dict(self.at["sums"])
        for name, opt in self.opts.items():
            _, losses = self.model(dataclasses.replace(step, phase=name))
            loss = sum(losses.values())
            self._check_finite(loss, losses, epoch)
            opt.zero_grad(set_to_none=True)
            self.fabric.backward(loss)
            self.consistent = False
            opt.step()
            self.scheds[name].step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach() * len(pair)
        self.n_new += len(pair)
        self.at.update(step=self.at["step"] + 1, sums=sums, n=self.at["n"] + len(pair))
        self.consistent = True
        return loss

    def _check_finite(self, loss, losses: dict, epoch: int) -> None:
        if not torch.isfinite(loss):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise TrainingDiverged(
                f"{self.cfg.name}: loss became {loss.item()} at epoch {epoch + 1} step {self.at['step'] + 1} "
                f"(non-finite term: {', '.join(bad) or 'the sum'}). "
                + (f"The last good checkpoint {self.out / CKPT} is kept; " if (self.out / CKPT).is_file()
                   else "No checkpoint was written yet; ")
                + "lower train.lr or the method's loss weights (e.g. method.cqd.lam) and start again "
                  "(without --resume, or in a new out_dir).")

    def _end_epoch(self, epoch: int) -> dict:
        """Metrics of the epoch, evaluation when due, the method's end-of-epoch hook, the checkpoint, the logs."""
        t, fabric, sums = self.cfg.train, self.fabric, self.at["sums"]
        dt = time.perf_counter() - self.epoch_t0
        self.train_s += dt
        self.seen += self.n_new * fabric.world_size
        totals = fabric.all_reduce(torch.stack([*sums.values(), torch.tensor(float(self.at["n"]), device=fabric.device)]).float(), reduce_op="sum")
        row = {"epoch": epoch + 1, "lr": self.scheds[next(iter(self.scheds))].get_last_lr()[0],
               "images_per_s": self.n_new * fabric.world_size / max(dt, 1e-9)}
        row.update({k: float(v / max(float(totals[-1]), 1)) for k, v in zip(sums, totals[:-1])})
        if self.compressor and epoch + 1 == t.epochs:  # a compressed g's BatchNorm statistics, re-estimated once at the end
            self.compressor.recalibrate(self.method.student)
        if (t.eval_every and (epoch + 1) % t.eval_every == 0) or epoch + 1 == t.epochs:
            row.update(self.evaluate())
        self.history.append(row)
        self._warn_if_exploding(row)
        if self._epoch_hooks(epoch):
            self._optimizers(offset=(epoch + 1) * self.steps_per_epoch)
        self._checkpoint(epoch + 1, 0)
        self.at.update(epoch=epoch + 1, step=0, sums={}, n=0)
        if self.writer:
            for k, v in row.items():
                self.writer.add_scalar(k, v, epoch + 1)
            _write_csv(self.history, self.out / METRICS)
        self.log(f"{self.cfg.name} epoch {epoch + 1}/{t.epochs}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        return row

    def _warn_if_exploding(self, row: dict) -> None:
        """Only NaN/inf stop a run; a cross-entropy far above chance (log K) means it is diverging all the same."""
        ce, chance = row.get("loss_ce"), math.log(self.num_classes)
        if ce is not None and ce > 3 * chance and not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(f"{self.cfg.name}: loss_ce={ce:.4g} at epoch {row['epoch']} is far above chance level "
                          f"(log {self.num_classes} = {chance:.2f}): the run is diverging. Lower train.lr (now "
                          f"{self.cfg.train.lr:g}) or the method's loss weights (e.g. method.cqd.lam); the paper used "
                          "lr 0.0005 with lambda 200 (the CUB/Cars presets do)", stacklevel=2)

    def evaluate(self) -> dict[str, float]:
        """The task's metrics of every network the method evaluates, on the test set and, prefixed `val_`,
        on the validation items when `data.val_fraction` holds some out (buffers synced first)."""
        if self.fabric.world_size > 1:
            # DDP broadcasts buffers at each forward, so after the last step the other ranks hold BatchNorm
            # stats of their own last batch; give every rank rank 0's, as model.pt holds.
            for b in self.method.buffers():
                torch.distributed.broadcast(b.data, src=0)
        metrics = self.task.evaluate(self.method.eval_models(), self.method.eval_views, self.test_loader,
                                          self.test_maker, self.fabric)
        if self.val_loader is not None:
            val = self.task.evaluate(self.method.eval_models(), self.method.eval_views, self.val_loader,
                                          self.maker, self.fabric)
            metrics.update({f"val_{k}": v for k, v in val.items()})
        return metrics

    def _checkpoint(self, epoch: int, step: int, sums: dict | None = None, n: int = 0) -> None:
        if sums and self.fabric.world_size > 1:  # mid-epoch (every rank stopped at this step): save all ranks' sums
            total = self.fabric.all_reduce(torch.stack([*sums.values(), torch.tensor(float(n), device=self.fabric.device)]).float(),
                                           reduce_op="sum")
            sums, n = dict(zip(sums, total[:-1])), int(total[-1])
        if self.fabric.is_global_zero:
            save_checkpoint({"format": FORMAT, "model_name": self.cfg.model, "num_classes": self.num_classes,
                             "in_chans": self.in_chans, "model": self.method.deployable().state_dict(),
                             "compress": self.compressor.record() if self.compressor else None,
                             "method": self.method.state_dict(),
                             "optimizers": {k: o.state_dict() for k, o in self.opts.items()},
                             "schedulers": {k: s.state_dict() for k, s in self.scheds.items()},
                             "epoch": epoch, "step_in_epoch": step, "epoch_n": n,
                             "epoch_sums": {k: float(v) for k, v in (sums or {}).items()},
                             "history": self.history[:epoch], "config": self.cfg.model_dump()}, self.out / CKPT)
        self.fabric.barrier()

    def _open_logs(self):
        if not self.fabric.is_global_zero:
            return None
        from torch.utils.tensorboard import SummaryWriter

        save_json(self.cfg.model_dump(), self.out / "config.json")
        return SummaryWriter(str(self.out / "tb"))

    def _bar(self, epoch: int, step: int):
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch, initial=step, desc=f"{self.cfg.name} epoch {epoch + 1}/{self.cfg.train.epochs}",
                    disable=not (self.cfg.train.progress and self.fabric.is_global_zero), leave=False, dynamic_ncols=True)

    def _progress(self, bar, loss) -> None:
        if bar.n % 10 == 0 or self.at["step"] == self.steps_per_epoch:
            rate = self.n_new * self.fabric.world_size / (time.perf_counter() - self.epoch_t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
        bar.update(1)

    def _finish(self) -> dict:
        cfg, fabric = self.cfg, self.fabric
        final = self.history[-1] if self.history else {}
        teachers = self.teachers.paths if self.teachers else []
        result = {"name": cfg.name, "method": cfg.method.name, "model": cfg.model, "seed": cfg.seed,
                  "degradation": cfg.data.degradation, "acc_hq": final.get("acc_hq"), "acc_lq": final.get("acc_lq"),
                  "val_acc_hq": final.get("val_acc_hq"), "val_acc_lq": final.get("val_acc_lq"),
                  **{k: final.get(k) for k in self.task.metrics},
                  "wall_s": time.perf_counter() - self.t0, "train_s": self.train_s,
                  "images_per_s": self.seen / self.train_s if self.train_s else None,
                  "teacher": teachers[0] if teachers else None, "teachers": teachers,
                  "world_size": fabric.world_size, "precision": fabric.strategy.precision.precision,
                  "params": count_params(self.method.deployable()),
                  "compress": self.compressor.record() if self.compressor else None,
                  "history": self.history, "config": cfg.model_dump()}
        if fabric.is_global_zero:
            save_model(self.method.deployable(), cfg, self.num_classes, self.in_chans, self.out / MODEL,
                       self.compressor.record() if self.compressor else None)
            save_json(result, self.out / RESULT)
        fabric.barrier()
        return result


def _write_csv(history: list[dict], path: Path) -> None:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    save_text(buf.getvalue(), path)
