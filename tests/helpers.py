"""Helpers shared by test files (imported as `helpers`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

from pathlib import Path

from torch import nn


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
    """A KeyboardInterrupt right after the trainer wrote metrics.csv for epoch `epochs_done` (its checkpoint is written)."""  # noqa: E501
    from cqd.engine import hooks

    real = hooks.write_csv

    def write(history, path):
        real(history, path)
        if len(history) == epochs_done:
            raise KeyboardInterrupt

    monkeypatch.setattr(hooks, "write_csv", write)


def interrupt_at_step(monkeypatch, n: int) -> None:
    """A KeyboardInterrupt before the n-th training step (1-based, over the whole run)."""
    from cqd.engine import trainer

    real, count = trainer.Run._step, [0]

    def step(self, batch, epoch):
        count[0] += 1
        if count[0] == n:
            raise KeyboardInterrupt
        return real(self, batch, epoch)

    monkeypatch.setattr(trainer.Run, "_step", step)


def tiny_cfg(root: Path, name: str, **over) -> dict:
    """A run of a few steps on 64 Fashion-MNIST items at 16 px, fp32, in root/name (cache in root/cache)."""
    cfg = {
        "name": name, "seed": 0, "out_dir": str(root / name), "cache_dir": str(root / "cache"), "model": "resnet8",
        "data": {"train_subset": 64, "test_subset": 32, "image_size": 16, "degradation": "lowres:size=4"},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "progress": False, "max_steps_per_epoch": 2,
                  "precision": "32-true"},
        "method": {"name": "cqd"},
    }
    return nested(cfg, **over)


class Score(nn.Module):
    """A stand-in discriminator: a * the mean of the map, per image."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, m):
        return self.a * m.float().mean((1, 2, 3))[:, None]
