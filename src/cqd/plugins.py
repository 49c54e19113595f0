"""Code from outside the package: tasks, methods, models, degradations and datasets registered by modules
that cqd imports before it reads its registries.

Two ways in: the `plugins:` key of a run config (a list of importable module names, e.g. a module of your
project on PYTHONPATH), and the `cqd.plugins` entry-point group of an installed package
(`[project.entry-points."cqd.plugins"] mytask = "mypkg.cqd_plugin"`). A plugin module registers its parts
on import, as the package's own modules do (`@TASKS.register("denoise")`, `@METHODS.register(...)`).
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from cqd.errors import ConfigError

_LOADED: set[str] = set()
_ENTRY_POINTS_LOADED = False


def load(names=()) -> None:
    """Import the `cqd.plugins` entry points (once) and the named modules (each once)."""
    global _ENTRY_POINTS_LOADED
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True
        for ep in entry_points(group="cqd.plugins"):
            _import(ep.value.partition(":")[0], f"entry point {ep.name!r} of group cqd.plugins")
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ConfigError(f"plugins must be a list of module names, e.g. plugins: [mypkg.cqd_plugin]; got {names!r}")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"plugins: {name!r} is not a module name (e.g. mypkg.cqd_plugin)")
        _import(name.strip(), f"plugins: {name!r}")


def _import(module: str, what: str) -> None:
    if module in _LOADED:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise ConfigError(f"{what}: no module named {module!r}; "
                              "is it installed, or its folder on PYTHONPATH?") from None
        raise
    _LOADED.add(module)
