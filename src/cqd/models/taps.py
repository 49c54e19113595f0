"""Feature taps: the outputs of named layers, collected with forward hooks (torchdistill's idea).

A layer is named by its module path (`features.3`, `layer4`, `stages.2`), as `model.named_modules()`
lists it, so no model's code changes: built-in nets, `tv:` and `timm:` models alike.
"""
from __future__ import annotations

import difflib

import torch
from torch import Tensor, nn

from cqd.errors import ConfigError


def unknown_layer(model: nn.Module, name: str, what: str) -> ConfigError:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=3)
    shown = ", ".join(names[:60]) + (f", ... ({len(names)} in all)" if len(names) > 60 else "")
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ConfigError(f"{what}: no layer named {name!r} in {type(model).__name__}.{hint} Valid names: {shown}")


class FeatureTaps:
    """Keeps the latest output of each named layer of `model` in `self.out` (name -> tensor).

    `what` says whose layers they are in an error (e.g. "method.fitnet.hint on the student").
    """

    def __init__(self, model: nn.Module, names: list[str], what: str = "feature tap"):
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules or not name:
                raise unknown_layer(model, name, what)
        self.names = list(names)
        self.out: dict[str, Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._keep(n)) for n in self.names]

    def _keep(self, name: str):
        def hook(module, args, output):
            self.out[name] = output

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def feature_maps(model: nn.Module, sample: Tensor) -> list[tuple[str, nn.Module, Tensor | None, Tensor]]:
    """Every named layer's 4-D output in one eval-mode forward of `sample`, in forward order:
    (module path, module, its first input when that is a tensor, its output)."""
    seen: list[tuple[str, nn.Module, Tensor | None, Tensor]] = []

    def hook(name):
        def keep(module, args, output):
            if isinstance(output, Tensor) and output.dim() == 4:
                seen.append((name, module, args[0] if args and isinstance(args[0], Tensor) else None, output))
        return keep

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        eval_forward(model, sample)
    finally:
        for h in handles:
            h.remove()
    return seen


def last_feature_map(model: nn.Module, sample: Tensor) -> str:
    """The path of the layer that gives the last 4-D feature map larger than 1x1 (the last stage before
    global pooling, when the input is large enough): the shallowest
    module whose output is that tensor (`features` for the built-in nets, `layer4` for torchvision's
    ResNets, `stages` for timm's ConvNeXt). The default tap of the feature methods."""
    seen = [(n, t) for n, m, _, t in feature_maps(model, sample) if "Pool" not in type(m).__name__]
    if not seen:
        raise ConfigError(f"{type(model).__name__} gives no 4-D feature map; name a layer explicitly")
    spatial = [t for _, t in seen if t.shape[-1] * t.shape[-2] > 1]  # 1x1 maps: squeeze-excite, pooled heads
    last = (spatial or [t for _, t in seen])[-1]
    same = [n for n, t in seen if t is last]
    return min(same, key=lambda n: n.count("."))


def stage_outputs(model: nn.Module, sample: Tensor) -> list[str]:
    """The output of each stage after the stem, in forward order: what AT taps and where FitNet's hint sits by the
    references' conventions (RepDistiller's and mdistiller's `feats[1:-1]`, three for the CIFAR ResNets). A model
    that lists them in `stage_layers` (the built-in nets) is taken at its word; for others (`tv:`, `timm:`), the
    last output of a block or stage (a module with children) at each spatial size, pools and 1x1 maps aside,
    named by the shallowest module that gives it (a stem of leaf layers, as torchvision's, is no stage)."""
    declared = getattr(model, "stage_layers", None)
    if declared:
        return list(declared)
    blocks = [(n, t) for n, m, _, t in feature_maps(model, sample)
              if any(True for _ in m.children()) and t.shape[-1] * t.shape[-2] > 1]
    runs: list[Tensor] = []  # the last map of each run of one spatial size
    for _, t in blocks:
        if runs and runs[-1].shape[-2:] == t.shape[-2:]:
            runs[-1] = t
        else:
            runs.append(t)
    out = [min((n for n, t in blocks if t is last), key=lambda n: n.count(".")) for last in runs]
    return out or [last_feature_map(model, sample)]


@torch.no_grad()
def eval_forward(model: nn.Module, sample: Tensor) -> None:
    """One forward in eval mode (BatchNorm statistics untouched), the model's mode restored after."""
    was = model.training
    try:
        model.eval()
        model(sample)
    finally:
        model.train(was)


def probe(model: nn.Module, layer: str | None, sample: Tensor, what: str) -> tuple[str, torch.Size]:
    """(layer, its output's shape on `sample`): the named layer, or the last feature map when None;
    a method sizes the parts it adds with it."""
    layer = layer or last_feature_map(model, sample)
    taps = FeatureTaps(model, [layer], what)
    try:
        eval_forward(model, sample)
    finally:
        taps.remove()
    return layer, taps.out[layer].shape
