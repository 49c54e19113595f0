"""Configs as plain YAML data: loading, `key=value` overrides and error messages.

Data flows one way: YAML + overrides -> a schema (each section lives with its owner: `cqd.engine.schema`
for a run, `cqd.experiments.schema` for grids and studies) -> the engine. Files are read with a safe
loader, so a tag like `!!python/object` is rejected, never executed. This module imports no registry.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cqd.errors import ConfigError

PRESETS = Path(__file__).parent / "configs"  # shipped configs; configs/ in the repo links here


def dotted(overrides: dict[str, Any]) -> list[str]:
    """{'method.cqd.lam': 50} -> ['method.cqd.lam=50'], values written as JSON (read back as YAML)."""
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


_SHOW = 80


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The keys allowed in the section at `loc` (e.g. ('method',) -> MethodConfig's fields)."""
    cls: Any = model
    parts = list(loc)
    while parts:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(str(parts.pop(0)))
        if field is None:
            return None
        cls = field.annotation
        if typing.get_origin(cls) is dict:  # e.g. columns: {name: ColumnConfig}: skip the name
            cls = typing.get_args(cls)[1]
            if not parts:
                return None
            parts.pop(0)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return None


def _origin(key: str, overrides: list[str]) -> str:
    """' (from override 'k=v')' when an override set `key` or the section holding it."""
    for item in reversed(overrides):
        k = item.partition("=")[0]
        if key == k or key.startswith(k + ".") or k.startswith(key + "."):
            return f" (from override {item!r})"
    return ""


def format_errors(err: ValidationError, source: str, model: type[BaseModel] = None, overrides: list[str] = ()) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1]) if model is not None else None
            msg = "unknown key"
            if allowed:
                close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                where = ".".join(str(p) for p in loc[:-1]) or "the top level"
                msg += f"{hint} ({where} takes: {', '.join(allowed)})"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg = f"must be a section (a mapping of keys), got {type(e.get('input')).__name__} {short(e.get('input'))}"
        else:
            msg = re.sub(r"^(Value|Assertion) error, ", "", e["msg"])
            got = e.get("input")
            if not (isinstance(got, str) and got and got in msg) and " moved to " not in msg:
                msg += f" (got {short(got)})"
        label = f"{key}: " if loc else ""  # a whole-config check names its keys itself
        lines.append(f"  {label}{msg}{_origin(key, list(overrides)) if loc else ''}")
    return f"invalid config {source}:\n" + "\n".join(lines)


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only: a `!!python/...` tag is an error, never run) that also
    refuses a key given twice in one mapping, which safe_load would silently resolve to the last."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            try:
                key = self.construct_object(key_node, deep=True)
                hash(key)
            except (TypeError, yaml.YAMLError):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_error(p: Path, e: yaml.YAMLError) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    where = f"{p} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else str(p)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    tag = re.search(r"constructor for the tag '([^']*)'", problem)
    if tag:
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return ConfigError(f"config file {where}: the tag {name} is not allowed; configs are plain data "
                           "(numbers, strings, lists, mappings), and tags that would build Python objects "
                           "or run code are refused (nothing was run)")
    context = getattr(e, "context", None)
    return ConfigError(f"config file {where} is not valid YAML: {problem}" + (f" ({context})" if context else ""))


def presets() -> list[str]:
    """The config files shipped with cqd (the repo's configs/ folder is a link to them)."""
    return sorted(f.name for f in PRESETS.iterdir() if f.suffix == ".yaml")


def _resolve_config(p: Path) -> Path:
    """`p` itself, else (for a bare preset name or `configs/NAME.yaml` outside the repo) the shipped preset."""
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder; pass a YAML file, "
                          f"e.g. one of configs/{{{','.join(presets())}}}")
    if p.is_file():
        return p
    preset = PRESETS / (p.name if p.suffix else p.name + ".yaml")
    if p.parent in (Path("configs"), Path()) and preset.is_file():
        return preset
    raise ConfigError(f"config file {p} does not exist; the shipped presets are configs/{{{','.join(presets())}}}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"a config must be a YAML file name, a dict or a RunConfig, "
                          f"got {type(path).__name__} {short(path)}")
    p = _resolve_config(Path(path))
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        raise _yaml_error(p, e) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text (is it a YAML file?)") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
    except RecursionError:
        raise ConfigError(f"config file {p} is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys (e.g. `method: {{name: cqd}}`), "
                          f"got a {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` sets data['a']['b']; the value is read as YAML (so 3, 0.5, true, null work). A key that
    holds dots itself, as a search space's `method.cqd.lam`, is matched whole: `search.method.cqd.lam.high=100`;
    in a mapping of such keys, a new key is the whole rest of the path: `search.train.lr={low: 0.01, high: 1}`."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys, got {type(data).__name__} {short(data)}")
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, (list, tuple)):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got {short(overrides)}")
    data = copy.deepcopy(data)
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"override {short(item)} should be a 'key=value' string, e.g. 'method.lam=50'")
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key or any(not k.strip() for k in key.split(".")):
            raise ConfigError(f"override {item!r} should look like key=value, e.g. method.lam=50")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        node, parts, i = data, [k.strip() for k in key.split(".")], 0
        while True:
            # a key that itself holds dots (a search space's `method.cqd.lam`) is matched whole, longest first
            # and in a mapping of such keys a new key is the whole rest: `search.train.lr={low: 0.01, high: 1}`
            dotted = any(isinstance(n, str) and "." in n for n in node)
            j = next((j for j in range(len(parts), i + 1, -1) if ".".join(parts[i:j]) in node),
                     len(parts) if dotted else i + 1)
            k = ".".join(parts[i:j])
            if j == len(parts):
                node[k] = value
                break
            if not isinstance(node.get(k, {}), dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:j])} is a value ({short(node[k])}), "
                                  f"not a section")
            node, i = node.setdefault(k, {}), j
    return data


def validate(model: type[BaseModel], data: dict[str, Any], source: str, overrides: list[str] = ()):
    """`model` validated from `data`; every failure is one ConfigError naming the keys (and the override that set
    them)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source, model, overrides)) from None
    except RecursionError:
        raise ConfigError(f"invalid config {source}: nested too deeply (a YAML alias refers to itself?)") from None
