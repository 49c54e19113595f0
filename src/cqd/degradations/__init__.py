"""Degradations T, looked up by a compact spec string shared by the CLI and YAML.

    lowres:size=7        one degradation with params
    clutter+lowres:size=16   '+' composes, left to right

A new degradation is one file in this folder with a `@DEGRADATIONS.register(name)` dataclass.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing

from cqd.degradations.base import Compose, Degradation, Draws, Identity
from cqd.errors import CQDError
from cqd.registry import Registry, import_modules

DEGRADATIONS: Registry[type[Degradation]] = Registry("degradation")
DEGRADATIONS.register("none")(Identity)

import_modules(__name__, __path__, skip=("base", "sweep"))  # each module registers its class (sweep: specs only)

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _coerce(deg: str, key: str, raw: str, typ) -> object:
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw.lower() in ("none", "null", ""):
            return None
        typ = args[0]
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return typ(raw)
    except (TypeError, ValueError):
        raise CQDError(
            f"degradation {deg!r}: parameter {key}={raw!r} should be of type {getattr(typ, '__name__', typ)}"
        ) from None


def _parse_one(part: str) -> Degradation:
    name, colon, params = part.partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise CQDError(f"malformed degradation spec {part!r}: expected name[:key=value,...], e.g. 'lowres:size=7'")
    cls = DEGRADATIONS.get(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, object] = {}
    if colon and not params.strip():
        raise CQDError(f"malformed degradation spec {part!r}: nothing after ':' "
                       "(e.g. 'lowres:size=7', or just 'lowres')")
    for item in (p.strip() for p in params.split(",")) if colon else []:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise CQDError(f"malformed parameter {item!r} in degradation spec {part!r}: expected key=value")
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            raise CQDError(f"degradation {name!r} has no parameter {key!r}; allowed: {allowed}")
        if key in kwargs:
            raise CQDError(f"degradation {name!r}: parameter {key!r} given twice")
        kwargs[key] = _coerce(name, key, raw.strip(), hints[key])
    return cls(**kwargs)


def parse_degradation(spec: str) -> Degradation:
    """Build T from a spec string like 'clutter:canvas=64+lowres:size=16'."""
    if not isinstance(spec, str) or not spec.strip():
        raise CQDError(f"degradation spec must be a non-empty string like 'lowres:size=7', got {spec!r}")
    parts = spec.split("+")
    if any(not p.strip() for p in parts):
        raise CQDError(f"malformed degradation spec {spec!r}: empty part around '+'")
    stages = [_parse_one(p) for p in parts]
    return stages[0] if len(stages) == 1 else Compose(stages=stages)


def check_spec(spec: str | None, image_size: int | None = None) -> str | None:
    """A config field's validator: `spec` itself when it parses (and fits `image_size`, e.g. lowres:size must
    not exceed it), else a ValueError with the parser's message. None passes (an unset optional field)."""
    if spec is None:
        return spec
    try:
        T = parse_degradation(spec)
        if image_size is not None:
            T.check(3, image_size)  # the built-in checks depend on the image size only
    except CQDError as e:
        raise ValueError(str(e)) from None
    return spec


__all__ = ["DEGRADATIONS", "Degradation", "Draws", "check_spec", "parse_degradation"]
