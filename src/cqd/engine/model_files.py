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


def saved_task(ck: dict) -> str | None:
    """The task a model file was trained for, from its saved config (None: a file without a config)."""
    config = ck.get("config")
    return config.get("task", "classification") if isinstance(config, dict) and config else None


def check_task(ck: dict, task: str, path: str | Path) -> None:
    """A model file of another task than the config's (an SR model checked on class labels, a classifier on SR
    images) is an error that names both, not a run on the wrong data."""
    saved = saved_task(ck)
    if saved is not None and saved != task:
        raise CheckpointError(f"{path} is a model of task {saved!r} (its saved config says so), but the config "
                              f"given is of task {task!r}: use a config of task {saved!r}, e.g. the one it was "
                              "trained with")


def load_model(path: str | Path, num_classes: int | None = None, in_chans: int | None = None,
               task: str | None = None):
    """A model saved by a finished run (`model.pt`): rebuilt from its own config, checked against the data (and
    against `task`, the config's task, when given)."""
    ck = load_model_file(path)
    if task is not None:
        check_task(ck, task, path)
    if num_classes is not None and ck["num_classes"] != num_classes:
        if saved_task(ck) in (None, "classification"):
            raise CheckpointError(f"{path} was trained for {ck['num_classes']} classes but this dataset has "
                                  f"{num_classes}")
        raise CheckpointError(f"{path} has {ck['num_classes']} output channels (task {saved_task(ck)!r}) but this "
                              f"run needs {num_classes}")
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
               compress: dict | None = None, meta: dict | None = None) -> None:
    """`model.pt`: the weights, what rebuilds the network (name, classes, channels; for a compressed g the pruned
    layers' channels and whether it is a fake-quant graph: `compress`), the run's config and `meta`, how its inputs
    were made (`classes`, `mean`, `std`, `image_size`: plain lists and numbers, see `preprocessing`)."""
    save_checkpoint({"model_name": getattr(model, "model_name", None) or cfg.model, "num_classes": num_classes,
                     "in_chans": in_chans, "model": model.state_dict(), "config": cfg.model_dump(),
                     "sym": getattr(model, "sym_spec", None), "compress": compress, **(meta or {})}, path)


PREPROCESSING = ("classes", "mean", "std", "image_size")


def input_meta(base, maker, image_size: int) -> dict:
    """What a deployed model needs to prepare its inputs, as `save_model` writes it: the dataset's class names and
    the pair maker's normalization (those it has) and the image size."""
    meta = {"image_size": int(image_size)}
    if getattr(base, "classes", None) is not None:
        meta["classes"] = [str(c) for c in base.classes]
    for key in ("mean", "std"):
        if getattr(maker, key, None) is not None:
            meta[key] = [float(v) for v in torch.as_tensor(getattr(maker, key)).flatten()]
    return meta


def preprocessing(ck: dict, path: str | Path) -> dict:
    """{classes, mean, std, image_size, in_chans} of a loaded model file: its own, or for a file written before
    cqd saved them, rebuilt from its saved config (the dataset's class names, read without decoding its images
    where the dataset allows). A CheckpointError names what is missing and why it could not be rebuilt."""
    meta = {k: ck.get(k) for k in PREPROCESSING}
    missing, why = [k for k, v in meta.items() if v is None], ""
    if missing and isinstance(ck.get("config"), dict):
        from cqd.engine.schema import run_config
        from cqd.errors import CQDError
        from cqd.tasks.classification.data import normalization, open_split

        try:
            cfg = run_config(ck["config"])
            meta["image_size"] = meta["image_size"] or cfg.data.image_size
            ds = open_split(cfg.data, "test")
            mean, std = normalization(ds)
            meta = {"classes": [str(c) for c in ds.classes], "mean": mean, "std": std,
                    **{k: v for k, v in meta.items() if v is not None}}
        except (CQDError, AttributeError) as e:
            why = f": rebuilding them from its saved config failed ({e})"
    missing = [k for k in PREPROCESSING if meta.get(k) is None]
    if missing:
        raise CheckpointError(f"{path} holds no {', '.join(missing)} (written before cqd saved them with the model)"
                              f"{why or ' and no config to rebuild them from'}; train it again, or predict with "
                              "the config's data available")
    return {**meta, "in_chans": ck["in_chans"]}


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return type(a) is type(b) and sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
