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


def interrupt_after_epoch(monkeypatch, epochs_done: int) -> None:
    """A KeyboardInterrupt right after the trainer wrote metrics.csv for epoch `epochs_done` (its checkpoint is written)."""
    from cqd.engine import trainer

    real = trainer._write_csv

    def write(history, path):
        real(history, path)
        if len(history) == epochs_done:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_write_csv", write)
