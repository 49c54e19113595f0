"""One training loop for every method (Lightning Fabric does devices, precision and DDP).

config -> task (datasets, pair maker, metrics) -> teachers -> Method -> named losses per phase -> this loop
-> metrics, checkpoints. The loop only sums a phase's losses and steps its optimizer; it never asks which
method or task it runs. What runs beside it (compression, logs, the progress bar, a caller's per-epoch
callback) are hooks at named points (`cqd.engine.hooks`). Setup (`cqd.engine.setup`) builds everything in
the method lifecycle's order. The step never waits for the device: the loss sums and the non-finite flags
stay on it and are read every `train.check_every` steps, at each epoch's end and before each checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from pathlib import Path

import torch
from lightning_fabric import Fabric

from cqd.compress.pruning import count_params
from cqd.engine import phases
from cqd.engine.checkpoint import FORMAT, load_resume_checkpoint, load_state
from cqd.engine.model_files import MODEL, save_model
from cqd.engine.precision import flush_denormals
from cqd.engine.schema import RunConfig, run_config
from cqd.engine.setup import Setup, build
from cqd.engine.signals import stop_on_signal
from cqd.errors import CheckpointError, ConfigError, TrainingDiverged
from cqd.files import save_checkpoint, save_json
from cqd.methods import METHODS, Step

CKPT, RESULT, METRICS = "last.ckpt", "result.json", "metrics.csv"


def train(cfg: RunConfig | dict, resume: bool = False, fabric: Fabric | None = None, on_epoch=None,
          force: bool = False) -> dict:
    """Train one run as configured; returns the result dict also written to `<out_dir>/result.json`.

    `on_epoch(row)` is called after each epoch's checkpoint with that epoch's metrics (the row of
    metrics.csv); a true return value ends the run there (e.g. a tuner's pruning), as a finished run.
    An `out_dir` that holds a finished run is an error unless `resume` (continue it) or `force` (replace it).
    """
    cfg = run_config(cfg)
    method = METHODS.get(cfg.method.name)
    if method.rounds(cfg.method.params) > 1:
        raise ConfigError(f"method {cfg.method.name!r} trains {method.rounds(cfg.method.params)} sequential rounds: "
                          "one run per round, which cqd.experiments.rounds.train (and `cqd train`) does")
    if not resume:
        fresh_out_dir(Path(cfg.out_dir), force)
    with flush_denormals():
        return Run.start(cfg, resume, fabric).fit(on_epoch)


def fresh_out_dir(out: Path, force: bool = False) -> None:
    """A run that starts from the beginning in `out`: a finished run there (its model.pt or result.json) is an
    error naming the ways on, or with `force` is deleted first (with its last.ckpt), saying so."""
    done = [name for name in (MODEL, RESULT) if (out / name).is_file()]
    if not done:
        return
    if not force:
        raise ConfigError(f"{out} holds a finished run ({', '.join(done)}), which training from the beginning would "
                          "replace: continue or re-evaluate it with --resume, replace it with --force (api: "
                          f"force=True), or give a new out_dir (e.g. out_dir={out}-2)")
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here; one says so
        print(f"replacing the finished run in {out} (--force / force=True: its {', '.join(done)} and last.ckpt are "
              "deleted)", flush=True)
    for name in (RESULT, MODEL, CKPT):
        (out / name).unlink(missing_ok=True)


class Run:
    """The loop's own state (where it is, what it has summed); `fit` is the loop."""

    def __init__(self, setup: Setup):
        self.s, self.cfg, self.fabric, self.hooks = setup, setup.cfg, setup.fabric, setup.hooks
        self.method, self.log, self.out = setup.method, setup.log, setup.out
        self.steps_per_epoch, self.total = setup.steps_per_epoch, setup.total
        self._restore(setup.resume)

    @classmethod
    def start(cls, cfg: RunConfig | dict, resume: bool = False, fabric: Fabric | None = None) -> "Run":
        """A run set up and ready to `fit` (its parts in `run.s`)."""
        return cls(build(run_config(cfg), resume, fabric, train))

    def _epoch_hooks(self, epoch: int) -> bool:
        """The method's end-of-epoch hook, then the hooks'; True when one of them changed the student."""
        changed = self.method.on_epoch_end(epoch)
        return any(self.hooks.call("on_epoch_end", self, epoch)) or changed

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
            self.start_epoch, self.start_step = ck["epoch"], ck["step_in_epoch"]
            self.history = ck["history"][: ck["epoch"]]
        offset = 0
        for epoch in range(self.start_epoch):
            if self._epoch_hooks(epoch):
                offset = (epoch + 1) * self.steps_per_epoch
        self._optimizers(offset)
        if ck is not None:
            self._load(ck)

    def _load(self, ck: dict) -> None:
        path = self.out / CKPT
        load_state(self.method, ck["method"], path, "method state (student and the method's own parts)")
        for kind, have in (("optimizers", self.opts), ("schedulers", self.scheds)):
            if set(ck[kind]) != set(have):
                raise CheckpointError(f"{path} holds {kind} {sorted(ck[kind])} but this method has {sorted(have)}; "
                                      "use another out_dir or drop --resume")
            for name, target in have.items():
                load_state(target, ck[kind][name], path, f"{kind[:-1]} {name!r}")
        if self.start_step:  # the saved sums are all ranks': rank 0 takes them, the others start at zero (same keys)
            zero = not self.fabric.is_global_zero
            self.partial = ({k: 0.0 if zero else v for k, v in ck.get("epoch_sums", {}).items()},
                            0 if zero else ck.get("epoch_n", 0))
        self.log(f"resuming {self.out} at epoch {self.start_epoch} step {self.start_step}")

    def fit(self, on_epoch=None) -> dict:
        self.t0, self.seen, self.train_s = time.perf_counter(), 0, 0.0
        # `at` is where a resumed run would continue; it advances only once a step's updates, loss sums and
        # counter are all done, so an interrupt at any point saves a consistent checkpoint.
        self.at = {"epoch": self.start_epoch, "step": self.start_step, "sums": {}, "n": 0}
        self.consistent, result = True, None
        self.hooks.call("on_fit_start", self)
        try:
            with stop_on_signal() as stop:
                for epoch in range(self.start_epoch, self.cfg.train.epochs):
                    self._epoch(epoch, stop)
                    row = self._end_epoch(epoch)
                    if on_epoch is not None and on_epoch(row):
                        self.log(f"{self.cfg.name}: stopped after epoch {epoch + 1} by the per-epoch callback")
                        break
                result = self._finish()
                # a signal after the last step's check (during the last evaluation or the final save) is not
                # lost: the run is complete and saved, and the caller (a grid's next cell) stops here. Checked on
                # this rank alone (no collective after the run's last barrier): under torchrun, a rank that
                # stops here ends the others.
                if stop.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            self._interrupted(result)
            raise
        finally:
            self.hooks.call("on_fit_end", self)
        return result

    def _epoch(self, epoch: int, stop) -> None:
        """The epoch's steps, from where a resumed run left off; reads the device every `check_every` steps."""
        t, fabric = self.cfg.train, self.fabric
        resumed = epoch == self.start_epoch
        step = self.start_step if resumed else 0
        self.s.sampler.set_epoch(epoch, step * t.batch_size)
        self.model.train()
        sums, n = self.partial if resumed else ({}, 0)
        sums = {k: torch.tensor(v, device=fabric.device) for k, v in sums.items()}
        self.at.update(epoch=epoch, step=step, sums=sums, n=n)
        self.health = Health(fabric.device, epoch * self.steps_per_epoch + step)
        self.epoch_t0, self.n_new = time.perf_counter(), 0
        self.hooks.call("on_epoch_start", self, epoch, step)
        for batch in self.s.loader:
            if self.at["step"] >= self.steps_per_epoch:
                break
            stop.check(fabric, due=self._due())
            self._step(batch, epoch)
            if self._due():
                self._check()
            self.hooks.call("on_step_end", self)
        if fabric.world_size > 1:  # every rank stops at this epoch's end if one was asked to since the last check
            stop.check(fabric)
        self.hooks.call("on_steps_done", self, epoch)

    def _due(self) -> bool:
        return self.at["step"] % self.cfg.train.check_every == 0

    def _step(self, batch, epoch: int) -> None:
        """One batch: each phase's forward, loss, backward and optimizer step, in the method's order."""
        s = self.s
        pair = s.maker(batch, self.fabric.device, epoch)
        logits, features = s.teachers(batch, pair, epoch) if s.teachers and self.method.uses_teacher else ([], [])
        step = Step(pair, logits, features, epoch, epoch * self.steps_per_epoch + self.at["step"], self.total)
        sums = dict(self.at["sums"])
        for name, opt in self.opts.items():
            _, losses = self.model(dataclasses.replace(step, phase=name))
            loss = sum(losses.values())
            self.health.add(loss, losses)
            opt.zero_grad(set_to_none=True)
            self.fabric.backward(loss)
            self.consistent = False
            opt.step()
            self.scheds[name].step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach() * len(pair)
        self.health.advance()
        self.n_new += len(pair)
        self.at.update(step=self.at["step"] + 1, sums=sums, n=self.at["n"] + len(pair))
        self.consistent = True

    def _check(self) -> None:
        """One read of the device: the first non-finite loss since the epoch began (an error), and the mean loss."""
        sums, n = self.at["sums"], max(self.at["n"], 1)
        loss = sum(sums.values()) / n if sums else None
        values = self.health.read(loss)
        if values["bad_step"] >= 0:
            raise self._diverged(values)
        self.hooks.call("on_check", self, values)

    def _diverged(self, values: dict) -> TrainingDiverged:
        epoch, step = divmod(int(values["bad_step"]), self.steps_per_epoch)
        bad = [k for k, v in values["bad_terms"].items() if v]
        kept = (f"The last good checkpoint {self.out / CKPT} is kept; " if (self.out / CKPT).is_file()
                else "No checkpoint was written yet; ")
        return TrainingDiverged(
            f"{self.cfg.name}: loss became {values['bad_value']} at epoch {epoch + 1} step {step + 1} "
            f"(non-finite term: {', '.join(bad) or 'the sum'}). " + kept
            + "lower train.lr or the method's loss weights (e.g. method.cqd.lam) and start again "
              "(without --resume, or in a new out_dir).")

    def _end_epoch(self, epoch: int) -> dict:
        """Metrics of the epoch, evaluation when due, the end-of-epoch hooks, the checkpoint, the logs."""
        self._check()
        t, fabric, sums = self.cfg.train, self.fabric, self.at["sums"]
        dt = time.perf_counter() - self.epoch_t0
        self.train_s += dt
        self.seen += self.n_new * fabric.world_size
        count = torch.tensor(float(self.at["n"]), device=fabric.device)
        totals = fabric.all_reduce(torch.stack([*sums.values(), count]).float(), reduce_op="sum")
        row = {"epoch": epoch + 1, "lr": self.scheds[next(iter(self.scheds))].get_last_lr()[0],
               "images_per_s": self.n_new * fabric.world_size / max(dt, 1e-9)}
        if sums:
            row.update(zip(sums, read_device(list(totals[:-1] / totals[-1:].clamp_min(1)))))
        self.hooks.call("on_before_evaluate", self, epoch)
        if (t.eval_every and (epoch + 1) % t.eval_every == 0) or epoch + 1 == t.epochs:
            row.update(self.evaluate())
        self.history.append(row)
        self._warn_if_exploding(row)
        if self._epoch_hooks(epoch):
            self._optimizers(offset=(epoch + 1) * self.steps_per_epoch)
        self._checkpoint(epoch + 1, 0)
        self.at.update(epoch=epoch + 1, step=0, sums={}, n=0)
        if fabric.is_global_zero:
            self.hooks.call("on_epoch_logged", self, row)
        self.log(f"{self.cfg.name} epoch {epoch + 1}/{t.epochs}: "
                 + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        return row

    def _warn_if_exploding(self, row: dict) -> None:
        """Only NaN/inf stop a run; a cross-entropy far above chance (log K) means it is diverging all the same."""
        ce, chance = row.get("loss_ce"), math.log(self.s.num_classes)
        if ce is not None and ce > 3 * chance and not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(f"{self.cfg.name}: loss_ce={ce:.4g} at epoch {row['epoch']} is far above chance level "
                          f"(log {self.s.num_classes} = {chance:.2f}): the run is diverging. Lower train.lr (now "
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
        s, models, views = self.s, self.method.eval_models(), self.method.eval_views
        metrics = s.task.evaluate(models, views, s.test_loader, s.test_maker, self.fabric)
        if s.val_loader is not None:
            val = s.task.evaluate(models, views, s.val_loader, s.maker, self.fabric)
            metrics.update({f"val_{k}": v for k, v in val.items()})
        return metrics

    def _interrupted(self, result) -> None:
        """Ctrl-C or SIGTERM: a consistent state is saved (unless a loss went non-finite), then the caller stops."""
        if result is not None:
            self.log(f"interrupted: {self.cfg.name} had finished and is saved in {self.out}; stopping as asked")
        elif self.consistent:
            if hasattr(self, "health"):
                self._check()  # a checkpoint never holds the weights of a non-finite step
            self._checkpoint(self.at["epoch"], self.at["step"], self.at["sums"], self.at["n"])
            self.log(f"interrupted: saved {self.out / CKPT} at epoch {self.at['epoch']} step {self.at['step']}; "
                     "continue with --resume")
        else:  # a second Ctrl-C inside an optimizer step: the weights in memory are half-updated
            self.log(f"interrupted during an optimizer step: kept the last checkpoint {self.out / CKPT}; "
                     "continue with --resume")

    def _checkpoint(self, epoch: int, step: int, sums: dict | None = None, n: int = 0) -> None:
        fabric = self.fabric
        if sums and fabric.world_size > 1:  # mid-epoch (every rank stopped at this step): save all ranks' sums
            count = torch.tensor(float(n), device=fabric.device)
            total = fabric.all_reduce(torch.stack([*sums.values(), count]).float(), reduce_op="sum")
            sums, n = dict(zip(sums, total[:-1])), int(total[-1])
        if fabric.is_global_zero:
            save_checkpoint({"format": FORMAT, "model_name": self.cfg.model, "num_classes": self.s.num_classes,
                             "in_chans": self.s.in_chans, "model": self.method.deployable().state_dict(),
                             **self._records(), "method": self.method.state_dict(),
                             "optimizers": {k: o.state_dict() for k, o in self.opts.items()},
                             "schedulers": {k: s.state_dict() for k, s in self.scheds.items()},
                             "epoch": epoch, "step_in_epoch": step, "epoch_n": n,
                             "epoch_sums": {k: float(v) for k, v in (sums or {}).items()},
                             "history": self.history[:epoch], "config": self.cfg.model_dump()}, self.out / CKPT)
        fabric.barrier()

    def _records(self) -> dict:
        return {"compress": None, **self.hooks.record(self)}

    def _finish(self) -> dict:
        cfg, fabric, s = self.cfg, self.fabric, self.s
        final = self.history[-1] if self.history else {}
        teachers = s.teachers.paths if s.teachers else []
        result = {"name": cfg.name, "method": cfg.method.name, "model": cfg.model, "seed": cfg.seed,
                  "degradation": cfg.data.degradation, "acc_hq": final.get("acc_hq"), "acc_lq": final.get("acc_lq"),
                  "val_acc_hq": final.get("val_acc_hq"), "val_acc_lq": final.get("val_acc_lq"),
                  **{k: final.get(k) for k in s.task.metrics},
                  "wall_s": time.perf_counter() - self.t0, "train_s": self.train_s,
                  "images_per_s": self.seen / self.train_s if self.train_s else None,
                  "teacher": teachers[0] if teachers else None, "teachers": teachers,
                  "teacher_calibration": s.teachers.calibrations if s.teachers else [],
                  "world_size": fabric.world_size, "precision": fabric.strategy.precision.precision,
                  "params": count_params(self.method.deployable()), **self._records(),
                  "history": self.history, "config": cfg.model_dump()}
        if fabric.is_global_zero:
            save_model(self.method.deployable(), cfg, s.num_classes, s.in_chans, self.out / MODEL, result["compress"],
                       s.meta)
            save_json(result, self.out / RESULT)
        fabric.barrier()
        return result


class Health:
    """Non-finite losses, tracked on the device without a wait: the first step (over the run) whose summed loss
    was NaN or inf, its value and which terms were non-finite; `read` brings them (and the mean loss) over at once."""

    def __init__(self, device, step: int):
        self.device = device
        self.step = torch.full((), step, dtype=torch.long, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_value = torch.zeros((), device=device)
        self.bad_terms: dict[str, torch.Tensor] = {}

    def add(self, loss: torch.Tensor, losses: dict) -> None:
        new = ~torch.isfinite(loss.detach()) & (self.bad_step < 0)
        for k, v in losses.items():
            was = self.bad_terms.get(k, torch.zeros((), dtype=torch.bool, device=self.device))
            self.bad_terms[k] = torch.where(new, ~torch.isfinite(v.detach()), was)
        self.bad_value = torch.where(new, loss.detach().float(), self.bad_value)
        self.bad_step = torch.where(new, self.step, self.bad_step)

    def advance(self) -> None:
        self.step += 1

    def read(self, loss: torch.Tensor | None) -> dict:
        names = list(self.bad_terms)
        extra = [loss.detach().float()] if loss is not None else []
        got = read_device([self.bad_step.float(), self.bad_value, *(self.bad_terms[k].float() for k in names), *extra])
        values = {"bad_step": int(got[0]), "bad_value": got[1], "bad_terms": dict(zip(names, got[2:2 + len(names)]))}
        if extra:
            values["loss"] = got[-1]
        return values


def read_device(tensors: list[torch.Tensor]) -> list[float]:
    """The loop's one way to read device values: one transfer (one wait) for all of them."""
    return torch.stack([t.reshape(()) for t in tensors]).tolist()
