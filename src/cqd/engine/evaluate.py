"""Evaluate a saved model on a config's test set (`cqd eval`)."""
from __future__ import annotations

from pathlib import Path

from cqd.config import RunConfig
from cqd.engine import classification
from cqd.engine.loaders import build_datasets, eval_loader, make_maker
from cqd.engine.model_files import load_model
from cqd.engine.precision import flush_denormals, make_fabric
from cqd.methods import METHODS


def evaluate_saved(model_path: str | Path, cfg: RunConfig) -> dict:
    """Top-1 of `model_path` on the test views the config's method evaluates (x: acc_hq, z: acc_lq)."""
    with flush_denormals():
        fabric = make_fabric(cfg.train, devices=1)
        _, test_ds, _, base_test = build_datasets(cfg)
        method = METHODS.get(cfg.method.name)
        classes = method.num_outputs(base_test.num_classes)
        model, _ = load_model(model_path, classes, base_test.in_chans)
        loader = fabric.setup_dataloaders(eval_loader(cfg, test_ds, base_test), use_distributed_sampler=False)
        res = classification.evaluate({"": fabric.setup_module(model)}, method.eval_views,
                                      loader, make_maker(cfg, base_test), fabric)
        return {"model": str(model_path), "degradation": cfg.data.degradation, "n_test": len(test_ds), **res}
