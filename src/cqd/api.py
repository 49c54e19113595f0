"""The Python API: what a notebook user calls. Each function takes a config path or dict plus overrides."""
from __future__ import annotations

from pathlib import Path

from cqd.config import apply_overrides
from cqd.engine.schema import RunConfig, load_run_config, run_config
from cqd.experiments.schema import GridConfig, TuneConfig, load_grid_config, load_tune_config


def load_config(path: str | Path | None = None, *overrides: str) -> RunConfig:
    """A validated RunConfig from a YAML file (or the defaults) and `key=value` overrides."""
    return load_run_config(path, list(overrides))


def _cfg(config, overrides) -> RunConfig:
    overrides = list(overrides)
    if isinstance(config, RunConfig):
        return run_config(apply_overrides(config.model_dump(), overrides), overrides) if overrides else config
    if isinstance(config, dict):
        return run_config(apply_overrides(config, overrides), overrides)
    return load_run_config(config, overrides)


def train(config: str | Path | dict | RunConfig | None = None, *overrides: str, resume: bool = False,
          force: bool = False) -> dict:
    """Train one method; returns the result (accuracies on high/low quality test views, history).

    `resume`: continue from `<out_dir>/last.ckpt` (with none there, a notice, and the run starts from the
    beginning). An out_dir that holds a finished run is an error unless `resume` or `force` (replace it)."""
    import os
    import warnings

    from cqd.experiments.rounds import resumable
    from cqd.experiments.rounds import train as _train

    cfg = _cfg(config, overrides)
    if resume and not resumable(cfg):
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here; one says so
            warnings.warn(f"no last.ckpt in {cfg.out_dir}: starting from the beginning", stacklevel=2)
        resume = False  # a fresh start, under its rule: a finished run there is not replaced without force
    return _train(cfg, resume=resume, force=force)


def evaluate(model_path: str | Path, config: str | Path | dict | RunConfig | None = None, *overrides: str,
             c=None) -> dict:
    """Top-1 of a saved model (`model.pt`) on the configured test set's high- and low-quality views (task sr:
    PSNR/SSIM). `c`: the loss mix of an `sgn` SR student, K weights >= 0 summing to 1 (e.g. [0.2, 0.3, 0.5])."""
    from cqd.engine.evaluate import evaluate_saved

    return evaluate_saved(model_path, _cfg(config, overrides), c=c)


def export(model_path: str | Path, format: str = "onnx", *overrides: str, out: str | Path | None = None,
           config: str | Path | dict | RunConfig | None = None, check: bool = True, force: bool = False) -> dict:
    """Write a saved model (`model.pt`) as `onnx`, `torchscript` or `pt2` (default path beside it) and check the
    written file: fp32 logits within 1e-3 of PyTorch's on a test batch; a QAT model goes out in its int8 form
    (ONNX QDQ or pt2; TorchScript is an error) and its top-1 on the test set within 0.5 points of PyTorch's.
    The test data come from `config` with `overrides` (default: the run's own config, saved in model.pt), a config
    of the model's task. An existing `out` is replaced only with `force`; `model_path` itself never.
    Returns {"path", "format", "form" (fp32/int8), "bytes", "check", "export_s"}."""
    from cqd.engine.checkpoint import load_model_file
    from cqd.export import export_model

    cfg = None
    if config is not None or overrides:
        cfg = _cfg(config if config is not None else load_model_file(model_path)["config"], overrides)
    return export_model(model_path, format, out, cfg, check, force=force)


def table(config: str | Path | dict | GridConfig, *overrides: str, force: bool = False, on_cell=None,
          executor: str | dict | None = None, wait: bool = True) -> dict:
    """Run (or resume) a Table 1 grid and write its report; returns {"markdown", "table", "report_dir", "reused",
    "submitted"} (`reused`: the cells finished before this call under the same settings; a finished cell made under
    other settings is a CellMismatch, before anything is trained, unless `force`).

    `config` is a grid YAML file, a dict (as a grid YAML would hold) or a loaded GridConfig, with `overrides`.
    `on_cell(name, result)` is called as each cell finishes (the CLI prints progress with it). `executor`: where the
    cells run, as the config's `executor:` (a name: local, ray, slurm; or a dict). `wait=False` (slurm): submit and
    return the job ids in "submitted", with no report; a later call collects.
    """
    from cqd.experiments.executors import execute, with_executor
    from cqd.experiments.grid import collect
    from cqd.reports import write_report

    if isinstance(config, GridConfig):
        config = config if not overrides else config.model_dump()
    grid = config if isinstance(config, GridConfig) else load_grid_config(config, list(overrides))
    grid = with_executor(grid, executor)
    ran = execute(grid, force=force, on_cell=on_cell, wait=wait)  # a CellMismatch before training anything
    if ran["submitted"]:
        return {"markdown": "", "table": None, "report_dir": None, "reused": ran["reused"],
                "submitted": ran["submitted"]}
    report_dir = Path(grid.out_dir) / "report"
    md, summary = write_report(collect(grid), grid, report_dir)  # the task's table
    if grid.deploy is not None:  # sizes, latencies and distillation gains, measured in this one process
        from cqd.files import save_text
        from cqd.reports.deploy import deploy_report

        deploy = deploy_report(collect(grid), grid, report_dir)
        if deploy:
            md += deploy
            save_text((report_dir / "table.md").read_text() + deploy, report_dir / "table.md")
    if grid.robustness is not None:  # the curves of some rows' models under a sweep of degradations
        from cqd.analysis.robustness import grid_robustness

        md += grid_robustness(collect(grid), grid, report_dir)
    return {"markdown": md, "table": summary, "report_dir": str(report_dir), "reused": ran["reused"], "submitted": []}


def robustness(models: list[str | Path], config: str | Path | dict | RunConfig | None = None, *overrides: str,
               specs: list[str] | None = None, baseline: str | int | None = None, out: str | Path | None = None,
               labels: list[str] | None = None) -> dict:
    """Top-1 of several saved models on the config's test set under a sweep of degradations (the config's
    `robustness:` section, or `specs`), and each model's mean top-1 and mCE relative to `baseline` (a model path,
    label or index; default the first). Writes robustness.csv/.json/.md/.png in `out` (default
    <out_dir>/robustness); returns {"models", "baseline", "rows", "families", "notes", "timing", "markdown", ...}."""
    from cqd.analysis.robustness import robustness as _robustness

    return _robustness(models, _cfg(config, overrides), specs=specs, baseline=baseline, out=out, labels=labels)


def predict(model_path: str | Path, inputs, top_k: int = 5, batch_size: int = 64, device: str = "auto",
            strict: bool = False) -> list[dict]:
    """The top-k classes of image files or folders of images by a saved `model.pt` or an exported `.onnx`, prepared
    as the model's training images were: [{"image", "top": [{"class", "index", "probability"}, ...]}].
    Unreadable images are skipped with a warning naming them (`strict`: an error)."""
    from cqd.predict import predict as _predict

    return _predict(model_path, inputs, top_k=top_k, batch_size=batch_size, device=device, strict=strict)


def tune(config: str | Path | dict | TuneConfig | GridConfig, *overrides: str,
         executor: str | dict | None = None) -> dict:
    """Run (or continue) an Optuna study choosing the searched keys on the validation split (never the test set);
    returns its report ({"study", "trials", "best", "out_dir"}) and writes best.yaml, trials.csv and plots in out_dir.

    `config` is a tune YAML file, a dict (as a tune YAML would hold) or a loaded TuneConfig, with `overrides`.
    A grid config (one with `columns:`) instead tunes each of its rows with `tune:` in each column, one study per
    row and column; that returns {column: {row id: report}}. `executor`: where the trials run, as the config's
    `executor:` (ray, slurm: `workers` workers on the one study).
    """
    from cqd.config import load_yaml
    from cqd.experiments.executors import study, with_executor
    from cqd.experiments.tune import tune_grid

    if isinstance(config, (TuneConfig, GridConfig)):
        config = config if not overrides else config.model_dump()
    if not isinstance(config, (TuneConfig, GridConfig)):
        data = config if isinstance(config, dict) else load_yaml(config)
        grid = isinstance(data, dict) and "columns" in data
        config = (load_grid_config if grid else load_tune_config)(config, list(overrides))
    config = with_executor(config, executor)
    return tune_grid(config, study=study) if isinstance(config, GridConfig) else study(config)


def sym(config: str | Path | dict, *overrides: str, force: bool = False) -> dict:
    """The sym-parameter table (`cqd sym`): one student conditioned on the quality mix c against K specialists;
    trains what is missing, scores it and writes `<out_dir>/report/sym.md`; returns {"markdown", "summary",
    "report_dir"}."""
    from cqd.analysis.symtable import load_sym_config, sym_table

    return sym_table(load_sym_config(config, list(overrides)), force=force)
