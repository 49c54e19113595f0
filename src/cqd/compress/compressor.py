"""What the engine does with `compress:`: prune g after it starts from f, then (once pruning is done) turn
it into a fake-quant training graph; record in `model.pt` what rebuilds it; rebuild it when loading.

Order in a run (the method lifecycle's): g built -> g starts from f -> `before_method` (one-shot pruning, or
the first step of iterative pruning) -> the method is built (its own parts fit the pruned g) ->
`transform_student` -> `after_method` (QAT when pruning is done) -> optimizers. After each epoch
`on_epoch_end` takes the next iterative pruning step, and QAT after the last; the engine then rebuilds
the optimizers, and a resumed run replays these steps before it loads the weights.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from cqd.compress import qat
from cqd.compress.pruning import Pruner, count_params, reshape_to
from cqd.errors import CheckpointError, ConfigError


class Compressor:
    """The run's compression of the student: a Pruner while pruning lasts, then QAT if asked."""

    def __init__(self, cfg, chw: tuple[int, int, int], batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
                 log=print):
        self.cfg, self.chw, self.batches, self.log = cfg.compress, tuple(chw), batches, log
        p = self.cfg.prune
        if p.schedule == "iterative" and p.steps > cfg.train.epochs:
            raise ConfigError(f"compress.prune.steps={p.steps} is more than train.epochs={cfg.train.epochs}: iterative "
                              "pruning takes one step before training and one after each of the next epochs")
        self.pruner: Pruner | None = None
        self.quantized = False
        self.method_name = cfg.method.name

    def before_method(self, student: nn.Module, sample: Tensor) -> None:
        """Prune g (the whole ratio, or the first iterative step) before the method sizes its own parts."""
        if self.cfg.prune.ratio <= 0:
            return
        n0 = count_params(student)
        self.pruner = Pruner(student, self.cfg.prune, sample, self.batches)
        self.pruner.step()
        self.recalibrate(student)
        self.log(f"compress.prune: {self.cfg.prune.importance} importance, ratio {self.cfg.prune.ratio:g} "
                 f"({self.cfg.prune.schedule}, step {self.pruner.done}): {n0} -> {count_params(student)} parameters")

    def after_method(self, method: nn.Module) -> None:
        """Refuse what cannot work, then start QAT now if no pruning step is left."""
        tapped = [n or "(the whole net)" for n, m in method.student.named_modules() if m._forward_hooks]
        iterative = self.pruner is not None and not self.pruner.finished
        if tapped and (iterative or self.cfg.qat):
            what = "iterative pruning (the channels change during training)" if iterative else \
                "compress.qat (the student becomes one exported graph without those layers)"
            raise ConfigError(f"method {self.method_name!r} reads the student's layers {', '.join(tapped)} through "
                              f"hooks, which {what} cannot keep; use compress.prune.schedule: oneshot without qat, "
                              "or a logit method (lq, staged, cqd)")
        if not iterative:
            self._quantize(method)

    def on_epoch_end(self, method: nn.Module, epoch: int) -> bool:
        """The next iterative pruning step after epoch `epoch` (0-based), and QAT after the last; True when g
        changed."""
        if self.pruner is None or self.pruner.finished or epoch + 1 >= self.pruner.cfg.steps:
            return False
        before = count_params(method.student)
        self.pruner.step()
        self.recalibrate(method.student)
        self.log(f"compress.prune: step {self.pruner.done}/{self.pruner.cfg.steps} after epoch {epoch + 1}: "
                 f"{before} -> {count_params(method.student)} parameters")
        if self.pruner.finished:
            self._quantize(method)
        return True

    @torch.no_grad()
    def recalibrate(self, student: nn.Module) -> None:
        """Re-estimate g's BatchNorm statistics on `recalibrate_bn` training batches of z (train-mode forward passes,
        no gradients). Pruning changes every layer's input, so f's running statistics no longer fit, and a short
        fine-tuning at a high lr leaves them lagging behind the weights (measured: wrn_16_2 pruned by half, QAT,
        one epoch at lr 0.1: 11% top-1 in eval mode, 39% after this). Eager BatchNorm layers get the exact mean
        over the batches (momentum None); a QAT graph, whose momentum is fixed in it, the running average."""
        n = self.cfg.bn_batches
        if n == 0:
            return
        bns = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        mode = student.training
        student.train()
        for _, (z, _y) in zip(range(n), self.batches(n)):
            student(z)
        student.train(mode)
        for m, momentum in zip(bns, saved):
            m.momentum = momentum

    def _quantize(self, method: nn.Module) -> None:
        if not self.cfg.qat or self.quantized:
            return
        old = method.student
        method.student = qat.prepare(old, self.chw)
        if any(m is old for m in method.modules()):
            raise ConfigError(f"method {self.method_name!r} keeps the student in more than one place, so compress.qat "
                              "cannot replace it with its fake-quant graph; use it without qat")
        self.quantized = True
        self.log("compress.qat: fake-quant inserted (torchao PT2E, x86 inductor quantizer: int8 weights per channel, "
                 "uint8 activations)")

    def record(self) -> dict | None:
        """What rebuilds the compressed g from its architecture's name (plain ints and bools: weights_only)."""
        if self.pruner is None and not self.cfg.qat:
            return None
        return {"channels": self.pruner.channels() if self.pruner else {}, "qat": self.quantized,
                "chw": list(self.chw)}


def rebuild(model: nn.Module, record: dict, where: str) -> nn.Module:
    """A freshly built model made into the compressed one `record` describes (pruned shapes, fake-quant graph);
    the saved weights are loaded into what this returns."""
    try:
        channels, quantized, chw = dict(record["channels"]), bool(record["qat"]), tuple(int(v) for v in record["chw"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{where}: its `compress` record is malformed ({record!r})") from None
    reshape_to(model, channels, where)
    return qat.prepare(model, chw) if quantized else model


_INT8: dict = {}  # (file, mtime, size) -> its converted int8 graph: `cqd eval` and export in one process convert once


def deployed(model: nn.Module, ck: dict, path) -> tuple[nn.Module, str]:
    """(the network a saved model is deployed as, its form): a QAT model's int8 graph (converted, cached per
    file), any other model as it is (fp32)."""
    import os
    from pathlib import Path

    if not (ck.get("compress") or {}).get("qat"):
        return model, "fp32"
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    if key not in _INT8:
        _INT8.clear()
        _INT8[key] = qat.convert(model)
    return qat.to_eval(_INT8[key]), "int8"  # eval again: a caller may have put the shared graph in train mode
