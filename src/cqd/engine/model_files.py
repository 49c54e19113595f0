"""Building models for a run, and the `model.pt` files finished runs leave (the teacher file of later runs)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cqd.engine.checkpoint import load_model_file, load_state
from cqd.errors import CheckpointError
from cqd.files import save_checkpoint
from cqd.models import create_model

MODEL = "model.pt"


def build_model(name: str, num_classes: int, in_chans: int, pretrained, channels_last: bool) -> nn.Module:
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
    if ck.get("sym") is not None:  # a network conditioned on the mix c: its gates around the same net
        from cqd.models.sym import SymNet

        model = SymNet(model, **ck["sym"])
    if ck.get("compress"):  # a pruned and/or fake-quant g: its shapes and graph first, then its weights
        from cqd.compress.compressor import rebuild

        model = rebuild(model, ck["compress"], str(path))
    load_state(model, ck["model"], path, f"weights of model {ck['model_name']!r}")
    return model, ck


def save_model(model: nn.Module, cfg, num_classes: int, in_chans: int, path: Path,
               compress: dict | None = None) -> None:
    """`model.pt`: the weights, what rebuilds the network (name, classes, channels; for a compressed g the pruned
    layers' channels and whether it is a fake-quant graph: `compress`) and the run's config."""
    save_checkpoint({"model_name": getattr(model, "model_name", None) or cfg.model, "num_classes": num_classes,
                     "in_chans": in_chans, "model": model.state_dict(), "config": cfg.model_dump(),
                     "sym": getattr(model, "sym_spec", None), "compress": compress}, path)


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return type(a) is type(b) and sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
