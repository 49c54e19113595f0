"""Evaluate a saved model on a config's test set (`cqd eval`)."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Subset

from cqd.config import RunConfig
from cqd.engine.trainer import (EpochSampler, build_datasets, evaluate, flush_denormals, load_model, make_fabric,
                                make_loader, make_maker)


def evaluate_saved(model_path: str | Path, cfg: RunConfig) -> dict:
    with flush_denormals():
        return _evaluate_saved(model_path, cfg)


def _evaluate_saved(model_path: str | Path, cfg: RunConfig) -> dict:
    t = cfg.train
    fabric = make_fabric(t, devices=1)
    _, test_ds, _, base_test = build_datasets(cfg)
    model, _ = load_model(model_path, base_test.num_classes, base_test.in_chans)
    model = fabric.setup_module(model)
    maker = make_maker(cfg, base_test)
    loader = make_loader(test_ds, base_test, t.batch_size * 2, EpochSampler(len(test_ds), 0, shuffle=False), cfg.data.num_workers, False)
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    res = evaluate(model, loader, maker, fabric, base_test.num_classes)
    n = len(test_ds.indices) if isinstance(test_ds, Subset) else len(test_ds)
    return {"model": str(model_path), "degradation": cfg.data.degradation, "n_test": n, **res}
