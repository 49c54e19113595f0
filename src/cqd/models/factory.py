"""`create_model`: one entry point for the small CIFAR nets, `tv:NAME` and `timm:NAME` models.

Every model comes back with a new `num_classes`-way head, an `in_chans`-channel stem, and
`num_classes` / `in_chans` / `model_name` attributes (a method that trains more networks of the
same kind, e.g. deep mutual learning, builds them from the name). Weights come from the library's download
(`pretrained=True`, tv/timm only) or from a file (`pretrained="path"`, any model); a file must fit
the model exactly except for a classifier head of another size, which is left freshly initialised,
and a 3-channel stem, which is adapted to `in_chans`.
"""
from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from cqd.errors import CheckpointError, CQDError
from cqd.files import load_checkpoint
from cqd.registry import Registry

MODELS: Registry[Callable[[int, int], nn.Module]] = Registry("model")

_SHOW = 3


def list_models() -> list[str]:
    """Names of the built-in models; torchvision and timm ones are `tv:NAME` and `timm:NAME`."""
    return MODELS.names()


def create_model(
    name: str, num_classes: int, in_chans: int = 3, pretrained: bool | str | os.PathLike = False
) -> nn.Module:
    """Build model `name` for `num_classes` classes and `in_chans`-channel input.

    `pretrained`: False (random init), True (download the tv/timm default weights), or a path to
    a state_dict file (`.safetensors`, or a torch file holding a state_dict, possibly under
    "model" or "state_dict").
    """
    if isinstance(pretrained, os.PathLike):
        pretrained = os.fspath(pretrained)
    if not isinstance(pretrained, (bool, str)):
        raise CQDError(
            f"pretrained must be true, false or a path to a weights file, got {pretrained!r}."
        )
    for arg, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CQDError(f"{arg} must be a positive integer, got {value!r} (model {name!r}).")
    source, sep, arch = name.partition(":")
    download = pretrained is True
    if sep and source == "tv":
        model = _torchvision(arch, num_classes, in_chans, download)
    elif sep and source == "timm":
        model = _timm(arch, num_classes, in_chans, download)
    else:
        builder, kwargs = builtin_spec(name)
        builder = functools.partial(builder, **kwargs) if kwargs else builder
        if download:
            raise CQDError(
                f"Model {name!r} is one of the small CIFAR nets, which have no pretrained weights; "
                "use pretrained: false, pretrained: <path to a checkpoint>, "
                "or a 'tv:NAME' / 'timm:NAME' model."
            )
        model = builder(num_classes, in_chans)
    if isinstance(pretrained, str):
        _load_file(model, pretrained, name)
    model.num_classes, model.in_chans, model.model_name = num_classes, in_chans, name
    return model


def builtin_spec(name: str) -> tuple[Callable[..., nn.Module], dict]:
    """(builder, keyword arguments) of a built-in model named `name` or `name:key=value,...`
    (e.g. `edsr:blocks=8,feats=32`): each key must be a keyword of the builder; values are read
    as int, float or bool by the builder's defaults."""
    import inspect

    base, sep, params = name.partition(":")
    builder = _builtin(base)
    if not sep:
        return builder, {}
    sig = inspect.signature(builder)
    keys = [k for k in sig.parameters if k not in ("num_classes", "in_chans")]
    kwargs: dict = {}
    for item in params.split(","):
        key, eq, raw = (s.strip() for s in item.partition("="))
        if not eq or not key or key not in keys or key in kwargs:
            why = ("expected key=value" if not eq or not key else f"{key!r} given twice" if key in kwargs
                   else f"no key {key!r}")
            raise CQDError(f"model {name!r}: {why}; {base} takes {', '.join(keys) or 'no keys'} "
                           f"(e.g. '{base}:{keys[0] if keys else 'key'}=...')")
        default = sig.parameters[key].default
        try:
            kwargs[key] = (raw.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)(raw)
        except (TypeError, ValueError):
            raise CQDError(f"model {name!r}: {key}={raw!r} should be a {type(default).__name__}") from None
    return builder, kwargs


def _builtin(name: str) -> Callable[[int, int], nn.Module]:
    try:
        return MODELS.get(name)
    except CQDError as exc:
        hint = "Torchvision and timm models are named 'tv:NAME' and 'timm:NAME'."
        raise CQDError(f"{exc} {hint}") from None


def _torchvision(arch: str, num_classes: int, in_chans: int, download: bool) -> nn.Module:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if arch not in names:
        raise CQDError(_unknown_arch("torchvision", arch, names, "torchvision.models.list_models()"))
    if not download:
        model = tvm.get_model(arch, weights=None, num_classes=num_classes)
        if in_chans != 3:
            _set_stem(model, f"tv:{arch}", in_chans, adapt=False)
        return model
    weights = tvm.get_model_weights(arch).DEFAULT
    try:
        model = tvm.get_model(arch, weights=weights)
    except Exception as exc:
        where = (
            f"place {os.path.basename(weights.url)} (from {weights.url}) in the torch hub cache "
            f"{_hub_cache()} ($TORCH_HOME/hub/checkpoints)"
        )
        raise CQDError(_no_weights(f"tv:{arch}", exc, where)) from exc
    head_name, head = _head(model)
    if not isinstance(head, nn.Linear):
        raise CQDError(
            f"tv:{arch} ends in a {type(head).__name__}, not a Linear layer, so its head cannot "
            "be replaced after loading the downloaded weights; "
            "use pretrained: false or pretrained: <path>."
        )
    new_head = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    model.set_submodule(head_name, new_head)
    if in_chans != 3:
        _set_stem(model, f"tv:{arch}", in_chans, adapt=True)
    return model


def _timm(arch: str, num_classes: int, in_chans: int, download: bool) -> nn.Module:
    import timm

    if ":" not in arch and not timm.is_model(arch):
        raise CQDError(_unknown_arch("timm", arch, timm.list_models(), "timm.list_models()"))
    if not download:
        return timm.create_model(arch, num_classes=num_classes, in_chans=in_chans)
    try:
        return timm.create_model(
            arch, pretrained=True, num_classes=num_classes, in_chans=in_chans
        )
    except Exception as exc:
        where = (
            "place them in the Hugging Face cache ($HF_HOME/hub; HF_HUB_OFFLINE=1 skips the "
            f"retries) or the torch hub cache {_hub_cache()} ($TORCH_HOME/hub/checkpoints)"
        )
        raise CQDError(_no_weights(f"timm:{arch}", exc, where)) from exc


def _unknown_arch(library: str, arch: str, names: Iterable[str], lister: str) -> str:
    close = difflib.get_close_matches(arch, list(names), n=5, cutoff=0.6)
    hint = f" Close names: {', '.join(close)}." if close else ""
    return f"Unknown {library} model {arch!r}.{hint} See {lister} for all."


def _no_weights(model: str, exc: Exception, where: str) -> str:
    return (
        f"Could not get the pretrained weights of {model!r} ({type(exc).__name__}: {exc}). "
        f"To use them offline, {where}; or pass pretrained: <path to a weights file>, "
        "or use pretrained: false."
    )


def _hub_cache() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier: the last leaf module that holds parameters."""
    leaves = [
        (name, m)
        for name, m in model.named_modules()
        if next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None
    ]
    return leaves[-1]


def _head_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head(s): timm says so in its config, otherwise `_head`."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if classifier:
        return (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return (_head(model)[0],)


def _stem(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def _from_rgb(weight: Tensor, in_chans: int) -> Tensor:
    """RGB filters for `in_chans` inputs: their mean, repeated and scaled by 3/in_chans, so an image
    whose channels are all equal gives the same response as its RGB copy."""
    return weight.mean(1, keepdim=True).repeat(1, in_chans, 1, 1) * (3 / in_chans)


def _set_stem(model: nn.Module, label: str, in_chans: int, adapt: bool) -> None:
    """Swap the first conv for one taking `in_chans` channels, from the RGB filters if `adapt`."""
    found = _stem(model)
    if found is None or found[1].in_channels != 3 or found[1].groups != 1:
        raise CQDError(
            f"Cannot find a 3-channel first conv in {label} to change it to in_chans={in_chans}."
        )
    name, conv = found
    new = nn.Conv2d(
        in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    if adapt:
        with torch.no_grad():
            new.weight.copy_(_from_rgb(conv.weight, in_chans))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    model.set_submodule(name, new)


def _read_state_dict(path: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(f"Weights file {path!r} does not exist (or is not a file).")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            obj = load_file(path, device="cpu")
        except Exception as exc:  # noqa: BLE001 - any failure to parse the file means it is not a weights file
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(f"Could not read weights file {path!r}: {type(exc).__name__}: {first}") from None
    else:  # cqd's own safe load: weights_only, and a refusal or a corrupt file in one paragraph naming it
        obj = load_checkpoint(path)
    if isinstance(obj, Mapping):
        nested = [obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)]
        obj = nested[0] if nested else obj
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"Weights file {path!r} holds no state_dict: expected a dict of tensors, "
            "or one under the key 'model' or 'state_dict'."
        )
    return dict(obj)


def _load_file(model: nn.Module, path: str, name: str) -> None:
    """Load `path` into `model`; only a head of another size and a 3-channel stem may differ.

    A missing BatchNorm `num_batches_tracked` is fine (files saved before PyTorch 0.4.1, such as
    some torchvision weights, lack it), as is a missing head.
    """
    state = _read_state_dict(path)
    own = model.state_dict()
    heads = tuple(f"{h}." for h in _head_names(model))
    stem = _stem(model)
    stem_key = f"{stem[0]}.weight" if stem else None
    missing, mismatched = [], []
    for key, target in own.items():
        if key not in state:
            if not key.startswith(heads) and not key.endswith(".num_batches_tracked"):
                missing.append(key)
            continue
        value = state[key]
        if value.shape == target.shape:
            continue
        if key == stem_key and _is_rgb_of(value, target):
            state[key] = _from_rgb(value, target.shape[1])
        elif key.startswith(heads):
            del state[key]
        else:
            mismatched.append(f"{key} (file {tuple(value.shape)}, model {tuple(target.shape)})")
    unexpected = [k for k in state if k not in own]
    found = {"missing": missing, "unexpected": unexpected, "shape mismatch": mismatched}
    problems = [f"{label}: {_few(keys)}" for label, keys in found.items() if keys]
    if problems:
        raise CheckpointError(
            f"Weights file {path!r} does not fit model {name!r} ({'; '.join(problems)}). "
            "Only the classifier head may differ; was it saved from another architecture?"
        )
    model.load_state_dict(state, strict=False)


def _is_rgb_of(value: Tensor, target: Tensor) -> bool:
    """Whether conv weight `value` is `target` but for taking 3 input channels."""
    return value.dim() == 4 and value.shape[1] == 3 and value[:, :1].shape == target[:, :1].shape


def _few(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def check_model_name(name: str) -> str:
    """A config field's validator: a built-in model name (with valid keys, `edsr:blocks=8`) is checked now;
    `tv:NAME` / `timm:NAME` when the model is built. Else a ValueError naming what is known."""
    source = name.partition(":")[0]
    if source in ("tv", "timm"):
        return name
    if ":" in name and source not in MODELS:
        raise ValueError(f"unknown model source {source!r} in {name!r}; use 'tv:NAME', 'timm:NAME' or a built-in name")
    try:
        MODELS.get(source)
        builtin_spec(name)
    except CQDError as e:
        hint = "" if ":" in name else " Torchvision and timm models are named 'tv:NAME' and 'timm:NAME'."
        raise ValueError(f"{e}{hint}") from None
    return name
