"""Structured pruning of the student with Torch-Pruning (DepGraph): channels are removed for real, and
layers coupled by a residual add or a concatenation lose the same channels.

Our choices (no paper fixes them for cross-quality distillation):
- Every layer loses the same share `ratio` of its channels (Torch-Pruning's local pruning, not global):
  the pruned shapes then depend on the ratio and the architecture only, never on the weights' values, so
  a resumed run replays the pruning on any weights and gets the shapes its checkpoint holds.
- The classifier head keeps its outputs (the classes), and, where a method taps the student's layers
  (FitNet, AT, FT, FEED: forward hooks), those layers are pruned too: a method's own parts are sized
  after the one-shot pruning (the engine prunes before it builds the method), so they fit.
- Taylor importance ranks channels by |w * dL/dw| of the student's own cross-entropy on z (not the
  method's loss), so a distilled row and its lambda-0 twin remove the same channels of f.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch.nn.functional as F
from torch import Tensor, nn

from cqd.errors import CheckpointError


def classifier(model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs are the classes: the built-in nets' `head`, timm's `get_classifier()`,
    torchvision's `fc` / `classifier` (their last Linear)."""
    get = getattr(model, "get_classifier", None)
    if callable(get) and isinstance(get(), nn.Module):
        return [get()]
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return [getattr(model, "head", None) or linears[-1]]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Pruner:
    """The run's pruning: `step()` removes the next share of channels (one step for `oneshot`, `steps` equal
    steps for `iterative`); `channels` records each pruned layer's (in, out) channels for model.pt."""

    def __init__(self, model: nn.Module, cfg, sample: Tensor,
                 batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]]):
        import torch_pruning as tp

        self.model, self.cfg, self.batches = model, cfg, batches
        self.before = channel_counts(model)
        imp = (tp.importance.GroupTaylorImportance() if cfg.importance == "taylor"
               else tp.importance.GroupMagnitudeImportance(p=2))
        self.pruner = tp.pruner.MetaPruner(model, sample, importance=imp, pruning_ratio=cfg.ratio,
                                           iterative_steps=cfg.steps if cfg.schedule == "iterative" else 1,
                                           ignored_layers=classifier(model), global_pruning=False)
        self.done = 0

    @property
    def finished(self) -> bool:
        return self.done >= (self.cfg.steps if self.cfg.schedule == "iterative" else 1)

    def step(self) -> None:
        """Remove the next share of channels (Taylor: after the gradients of the student's CE on a few batches)."""
        if self.cfg.importance == "taylor":
            self._gradients()
        self.pruner.step()
        self.model.zero_grad(set_to_none=True)
        self.done += 1

    def _gradients(self) -> None:
        mode = self.model.training
        self.model.eval()  # BatchNorm statistics of f stay as they are
        self.model.zero_grad(set_to_none=True)
        for z, y in self.batches(self.cfg.taylor_batches):
            F.cross_entropy(self.model(z).float(), y).backward()
        self.model.train(mode)

    def channels(self) -> dict[str, list[int | None]]:
        """{module path: [in channels, out channels]} of every layer pruning changed (plain ints: weights_only)."""
        now = channel_counts(self.model)
        return {k: v for k, v in now.items() if v != self.before.get(k)}


def channel_counts(model: nn.Module) -> dict[str, list[int | None]]:
    """{path: [in, out]} of every layer Torch-Pruning knows how to prune."""
    import torch_pruning as tp
    from torch_pruning.pruner.function import PrunerBox

    out = {}
    for name, m in model.named_modules():
        kind = tp.ops.module2type(m)
        if name and kind in PrunerBox:
            f = PrunerBox[kind]
            out[name] = [f.get_in_channels(m), f.get_out_channels(m)]
    return out


def reshape_to(model: nn.Module, channels: dict, where: str = "model.pt") -> nn.Module:
    """Give a freshly built `model` the pruned shapes `channels` records (Torch-Pruning's pruning functions
    drop the trailing channels; the weights that follow overwrite them). In place; returns `model`."""
    import torch_pruning as tp
    from torch_pruning.pruner.function import PrunerBox

    modules = dict(model.named_modules())
    missing = sorted(set(channels) - set(modules))
    if missing:
        raise CheckpointError(f"{where} records pruned layers {', '.join(missing[:3])} that model "
                              f"{type(model).__name__} does not have: was it saved from another architecture?")
    for name, (cin, cout) in channels.items():
        m = modules[name]
        f = PrunerBox[tp.ops.module2type(m)]
        have_out = f.get_out_channels(m)
        if cout is not None and have_out is not None and have_out > cout:
            f.prune_out_channels(m, list(range(cout, have_out)))
        have_in = f.get_in_channels(m)
        if cin is not None and have_in is not None and have_in > cin:
            f.prune_in_channels(m, list(range(cin, have_in)))
    return model
