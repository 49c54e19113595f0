"""Evaluate a saved model on a config's test set (`cqd eval`)."""
from __future__ import annotations

from pathlib import Path

from cqd.compress.compressor import deployed
from cqd.config import RunConfig
from cqd.engine.loaders import eval_loader
from cqd.engine.model_files import load_model
from cqd.engine.precision import flush_denormals, make_fabric
from cqd.engine.tasks import task_of
from cqd.methods import METHODS


def evaluate_saved(model_path: str | Path, cfg: RunConfig) -> dict:
    """The task's metrics of `model_path` on the config's test set: top-1 on the views the method evaluates
    (x: acc_hq, z: acc_lq), or for task sr PSNR/SSIM-Y on the whole test images beside bicubic's."""
    with flush_denormals():
        task = task_of(cfg)
        fabric = make_fabric(cfg.train, devices=1)
        _, test_ds, _, base_test = task.build_datasets(cfg)
        method = METHODS.get(cfg.method.name)
        classes = method.num_outputs(base_test.num_classes, cfg.method.params)
        model, ck = load_model(model_path, classes, base_test.in_chans)
        model, form = deployed(model, ck, model_path)  # a QAT model is evaluated in its converted int8 form
        if form == "int8":  # the int8 graph computes in fp32 between its quantize/dequantize ops: no autocast
            fabric = make_fabric(cfg.train.model_copy(update={"precision": "32-true"}), devices=1)
        loader = fabric.setup_dataloaders(eval_loader(cfg, test_ds, base_test), use_distributed_sampler=False)
        res = task.evaluate({"": fabric.setup_module(model)}, method.eval_views,
                            loader, task.make_maker(cfg, base_test), fabric)
        return {"model": str(model_path), "form": form, **task.describe(cfg), "n_test": len(test_ds), **res}
