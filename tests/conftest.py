"""Shared fixtures. Tests run single-threaded torch so parallel workers don't oversubscribe 2 cores."""
from __future__ import annotations

import pytest
import torch

from helpers import nested

torch.set_num_threads(1)


@pytest.fixture
def tiny_config(tmp_path):
    """A RunConfig dict for a few-step run on a small slice of the embedded Fashion-MNIST."""

    def make(**over) -> dict:
        cfg = {
            "name": "tiny",
            "seed": 0,
            "out_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"),
            "model": "resnet8",
            "data": {"train_subset": 256, "test_subset": 128, "image_size": 32, "degradation": "lowres:size=8"},
            "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "progress": False, "max_steps_per_epoch": 4,
                  "precision": "32-true"},  # the same numbers on every CPU (auto is bf16 where native)
            "method": {"name": "lq"},
        }
        return nested(cfg, **over)

    return make
