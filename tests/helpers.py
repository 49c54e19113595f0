"""Helpers shared by test files (imported as `helpers`: pytest puts tests/ on sys.path)."""
from __future__ import annotations


def nested(cfg: dict, **over) -> dict:
    """Set nested keys written with `__`: nested(cfg, train__epochs=3) sets cfg['train']['epochs']."""
    for key, value in over.items():
        node = cfg
        *parents, last = key.split("__")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return cfg
