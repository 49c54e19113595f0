"""Shared fixtures and the suite's ground rules: no network, reproducible examples, single-threaded torch.

Network. Tests never download anything. This file sets CQD_NO_DOWNLOAD=1 in the environment (inherited
by every `python -m cqd ...` a test starts), which turns Fashion-MNIST's torchvision download fallback
into a DataError naming /usr/share/datasets/fashion-mnist and `apt-get install dataset-fashion-mnist`.
A test that needs the data and finds none fails with that message; the report header says up front
whether the files were found.

Hypothesis. Two settings profiles:

    ci       (default) derandomize=True, no example database, deadline=None: every run tries the same
             examples, so a failure reproduces and a pass does not depend on luck.
    explore  random examples, 10x as many, failures printed with a reproduction blob: for hunting bugs.

Select one with `python -m pytest --hypothesis-profile=explore` or `HYPOTHESIS_PROFILE=explore python -m
pytest` (the command-line option wins). A test's own `max_examples` is its count under `ci`; tests scale it
with `examples(n)` (= n * settings.default.max_examples // 100), so `explore` runs 10x each of them.

Threads. Tests run single-threaded torch so parallel workers don't oversubscribe 2 cores.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from helpers import nested

os.environ["CQD_NO_DOWNLOAD"] = "1"  # before any test (or child process) can look for Fashion-MNIST

settings.register_profile("ci", max_examples=100, derandomize=True, database=None, deadline=None,
                          print_blob=False)
settings.register_profile("explore", max_examples=1000, derandomize=False, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)


def pytest_report_header(config):
    lines = [f"hypothesis profile: {settings.get_current_profile_name()}"]
    try:
        from cqd.data.fashion_mnist import _locate

        found = sorted({str(p.parent) for split in ("train", "test") for p in _locate(None, split)})
        lines.append(f"Fashion-MNIST: {', '.join(found)}")
    except Exception as e:  # noqa: BLE001 - a header line, never a crash of the session
        lines.append(f"Fashion-MNIST: NOT USABLE, the tests that train on it will fail: {type(e).__name__}: {e}")
    return lines


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
