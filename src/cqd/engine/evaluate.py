"""Evaluate a saved model on a config's test set (`cqd eval`)."""
from __future__ import annotations

from pathlib import Path

from cqd.compress.compressor import deployed
from cqd.engine.loaders import eval_loader
from cqd.engine.model_files import load_model
from cqd.engine.precision import flush_denormals, make_fabric
from cqd.engine.schema import RunConfig
from cqd.errors import ConfigError
from cqd.methods import METHODS
from cqd.tasks import task_of


def evaluate_saved(model_path: str | Path, cfg: RunConfig, c=None) -> dict:
    """The task's metrics of `model_path` on the config's test set: top-1 on the views the method evaluates
    (x: acc_hq, z: acc_lq), or for task sr PSNR/SSIM-Y on the whole test images beside bicubic's.
    `c` (K weights, a list or a string such as "0.2,0.3,0.5"): the mix of an sr model conditioned on it
    (method sgn); default its own `fixed_c` when it was trained at one."""
    with flush_denormals():
        task = task_of(cfg)
        fabric = make_fabric(cfg.train, devices=1)
        _, test_ds, _, base_test = task.build_datasets(cfg)
        method = METHODS.get(cfg.method.name)
        classes = method.num_outputs(base_test.num_classes, cfg.method.params)
        model, ck = load_model(model_path, classes, base_test.in_chans, task=cfg.task)
        model, form = deployed(model, ck, model_path)  # a QAT model is evaluated in its converted int8 form
        model, c = at_mix(model, ck, c, task, model_path)
        needs_mix(model, ck, cfg, model_path)
        if form == "int8":  # the int8 graph computes in fp32 between its quantize/dequantize ops: no autocast
            fabric = make_fabric(cfg.train.model_copy(update={"precision": "32-true"}), devices=1)
        loader = fabric.setup_dataloaders(eval_loader(cfg, test_ds, base_test), use_distributed_sampler=False)
        res = task.evaluate({"": fabric.setup_module(model)}, method.eval_views,
                            loader, task.make_maker(cfg, base_test), fabric)
        return {"model": str(model_path), "form": form, **task.describe(cfg), **({"c": c} if c else {}),
                "n_test": len(test_ds), **res}


def at_mix(model, ck: dict, c, task, path) -> tuple:
    """(the model to evaluate, the c it runs at): a network conditioned on the mix c (an `sgn` SR student) with c
    fixed, checked to be K weights >= 0 summing to 1; a model without gates is refused a c."""
    from cqd.models.sym import SymNet

    if isinstance(c, str):
        text = c.strip().strip("[]")
        try:
            c = [float(v) for v in text.replace(",", " ").split()]
        except ValueError:
            raise ConfigError(f"c={text!r}: give the mix as numbers, e.g. --c 0.2,0.3,0.5") from None
    if not isinstance(model, SymNet):
        if c is not None:
            raise ConfigError(f"{path} has no sym gates (it was not trained conditioned on a mix c, as method sgn "
                              "trains): evaluate it without c")
        return model, None
    return task.at_mix(model, ck, c, path)


def needs_mix(model, ck: dict, cfg: RunConfig, path) -> None:
    """A classifier conditioned on the mix c (method symcqd) is evaluated on blends that carry their c: with a
    config of a mix-conditioned method and `data.mix` (as it was trained), else a ConfigError saying so."""
    from cqd.models.sym import SymNet

    if not isinstance(model, SymNet) or METHODS.get(cfg.method.name).mix_conditioned:
        return
    saved = ck.get("config") or {}
    mix = (saved.get("data") or {}).get("mix") or {}
    degs = ",".join(mix.get("degradations") or []) or "..."
    method = (saved.get("method") or {}).get("name", "symcqd")
    raise ConfigError(f"{path} is conditioned on the quality mix c of {model.k} degradations (method {method!r}): "
                      f"evaluate it on blends that carry their c, with method.name={method} and "
                      f"data.mix.degradations=[{degs}] (as trained), and data.mix.c=[...] for one fixed mix; this "
                      f"config's method {cfg.method.name!r} gives it no c")
