"""MkDocs hook: tables generated from cqd's registries at build time.

A page line that is exactly one of these markers is replaced by a markdown table:

    <!-- cqd:methods -->        cqd.methods.METHODS: name, label, first paragraph of the class docstring
    <!-- cqd:degradations -->   cqd.degradations.DEGRADATIONS: spec name, keys with defaults, docstring
    <!-- cqd:models -->         cqd.models.factory.MODELS: name, spec keys with defaults, module docstring

The tables come from the installed package, so they list what the code registers. If `cqd` cannot be
imported, or a marker is unknown, or an entry has no docstring to show, the build stops with an error:
a table is never dropped silently.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

from mkdocs.exceptions import PluginError

MARKER = re.compile(r"^<!-- cqd:([a-z_]+) -->[ \t]*$", re.MULTILINE)


def _import(module: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or an error raised while the package imports
        raise PluginError(
            f"docs/hooks/registries.py: cannot import {module} ({type(e).__name__}: {e}). The manual's "
            "method, degradation and model tables are generated from the installed package: install it "
            "first (bash scripts/install.sh test), then run mkdocs in the same Python."
        ) from e


def on_config(config, **kwargs):
    """Fail at the start of the build, not at the first page, when cqd is not importable."""
    for module in ("cqd", "cqd.methods", "cqd.degradations", "cqd.models", "cqd.models.factory"):
        _import(module)
    return config


def _first_paragraph(text: str | None) -> str:
    """The docstring's first paragraph as one line, with `|` escaped for a table cell."""
    if not text:
        return ""
    para = inspect.cleandoc(text).split("\n\n", 1)[0]
    return " ".join(para.split()).replace("|", "\\|")


def _own_doc(obj) -> str:
    """The object's own docstring (not one inherited from a base class), else its module's."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not doc:
        doc = getattr(inspect.getmodule(obj), "__doc__", None)
    line = _first_paragraph(doc)
    if not line:
        raise PluginError(
            f"docs/hooks/registries.py: {obj.__module__}.{obj.__qualname__} has no docstring (nor has its "
            "module); the manual's tables show its first paragraph, so write one."
        )
    return line


def _value(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _flag(v: bool) -> str:
    return "yes" if v else ""


def methods_table() -> str:
    registry = _import("cqd.methods").METHODS
    init = {"never": "", "if_same": "if same architecture", "always": "yes"}
    lines = ["| name | label | what it does | uses f's outputs | starts from f |", "|---|---|---|---|---|"]
    for name in registry.names():
        cls = registry.get(name)
        label = str(getattr(cls, "label", "") or "").replace("|", "\\|")
        start = init.get(getattr(cls, "init_from_teacher", "never"), str(getattr(cls, "init_from_teacher", "")))
        lines.append(f"| `{name}` | {label} | {_own_doc(cls)} | {_flag(getattr(cls, 'uses_teacher', False))} "
                     f"| {start} |")
    return "\n".join(lines)


def degradations_table() -> str:
    registry = _import("cqd.degradations").DEGRADATIONS
    lines = ["| name | keys (defaults) | what it does |", "|---|---|---|"]
    for name in registry.names():
        cls = registry.get(name)
        keys = []
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                if f.init and not f.name.startswith("_"):
                    default = f.default if f.default is not dataclasses.MISSING else "required"
                    keys.append(f"{f.name}={_value(default)}")
        lines.append(f"| `{name}` | {_code(','.join(keys))} | {_own_doc(cls)} |")
    return "\n".join(lines)


def models_table() -> str:
    _import("cqd.models")  # importing the package registers every built-in model
    registry = _import("cqd.models.factory").MODELS
    lines = ["| name | spec keys (defaults) | family |", "|---|---|---|"]
    for name in registry.names():
        builder = registry.get(name)
        keys = [f"{p.name}={_value(p.default)}" for p in inspect.signature(builder).parameters.values()
                if p.name not in ("num_classes", "in_chans") and p.default is not inspect.Parameter.empty]
        module = inspect.getmodule(builder)
        family = _first_paragraph(getattr(module, "__doc__", None)).split(". ")[0].rstrip(".")
        if not family:
            raise PluginError(f"docs/hooks/registries.py: module {builder.__module__} (model {name!r}) "
                              "has no docstring.")
        lines.append(f"| `{name}` | {_code(','.join(keys))} | {family} |")
    return "\n".join(lines)


TABLES = {"methods": methods_table, "degradations": degradations_table, "models": models_table}


def on_page_markdown(markdown, page, config, files, **kwargs):
    def replace(match: re.Match) -> str:
        kind = match.group(1)
        if kind not in TABLES:
            raise PluginError(f"{page.file.src_path}: unknown marker <!-- cqd:{kind} --> "
                              f"(known: {', '.join(sorted(TABLES))}).")
        return TABLES[kind]()

    return MARKER.sub(replace, markdown)
