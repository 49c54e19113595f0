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


def train(config: str | Path | dict | RunConfig | None = None, *overrides: str, resume: bool = False) -> dict:
    """Train one method; returns the result (accuracies on high/low quality test views, history)."""
    from cqd.experiments.rounds import train as _train

    return _train(_cfg(config, overrides), resume=resume)


def evaluate(model_path: str | Path, config: str | Path | dict | RunConfig | None = None, *overrides: str,
             c=None) -> dict:
    """Top-1 of a saved model (`model.pt`) on the configured test set's high- and low-quality views (task sr:
    PSNR/SSIM). `c`: the loss mix of an `sgn` SR student, K weights >= 0 summing to 1 (e.g. [0.2, 0.3, 0.5])."""
    from cqd.engine.evaluate import evaluate_saved

    return evaluate_saved(model_path, _cfg(config, overrides), c=c)


def export(model_path: str | Path, format: str = "onnx", *overrides: str, out: str | Path | None = None,
           config: str | Path | dict | RunConfig | None = None, check: bool = True) -> dict:
    """Write a saved model (`model.pt`) as `onnx`, `torchscript` or `pt2` (default path beside it) and check the
    written file: fp32 logits within 1e-3 of PyTorch's on a test batch; a QAT model goes out in its int8 form
    (ONNX QDQ or pt2; TorchScript is an error) and its top-1 on the test set within 0.5 points of PyTorch's.
    The test data come from `config` with `overrides` (default: the run's own config, saved in model.pt).
    Returns {"path", "format", "form" (fp32/int8), "bytes", "check", "export_s"}."""
    from cqd.engine.checkpoint import load_model_file
    from cqd.export import export_model

    cfg = None
    if config is not None or overrides:
        cfg = _cfg(config if config is not None else load_model_file(model_path)["config"], overrides)
    return export_model(model_path, format, out, cfg, check)


def table(config: str | Path | dict | GridConfig, *overrides: str, force: bool = False, on_cell=None) -> dict:
    """Run (or resume) a Table 1 grid and write its report; returns {"markdown", "table", "report_dir"}.

    `config` is a grid YAML file, a dict (as a grid YAML would hold) or a loaded GridConfig, with `overrides`.
    `on_cell(name, result)` is
    called as each cell finishes (the CLI prints progress with it).
    """
    from cqd.experiments.grid import collect, run_grid
    from cqd.reports import write_report

    if isinstance(config, GridConfig):
        config = config if not overrides else config.model_dump()
    grid = config if isinstance(config, GridConfig) else load_grid_config(config, list(overrides))
    run_grid(grid, force=force, on_cell=on_cell)
    report_dir = Path(grid.out_dir) / "report"
    md, summary = write_report(collect(grid), grid, report_dir)  # the task's table
    if grid.deploy is not None:  # sizes, latencies and distillation gains, measured in this one process
        from cqd.files import save_text
        from cqd.reports.deploy import deploy_report

        deploy = deploy_report(collect(grid), grid, report_dir)
        if deploy:
            md += deploy
            save_text((report_dir / "table.md").read_text() + deploy, report_dir / "table.md")
    return {"markdown": md, "table": summary, "report_dir": str(report_dir)}


def tune(config: str | Path | dict | TuneConfig | GridConfig, *overrides: str) -> dict:
    """Run (or continue) an Optuna study choosing the searched keys on the validation split (never the test set);
    returns its report ({"study", "trials", "best", "out_dir"}) and writes best.yaml, trials.csv and plots in out_dir.

    `config` is a tune YAML file, a dict (as a tune YAML would hold) or a loaded TuneConfig, with `overrides`.
    A grid config (one with `columns:`) instead tunes each of its rows with `tune:` in each column, one study per
    row and column; that returns {column: {row id: report}}.
    """
    from cqd.config import load_yaml
    from cqd.experiments.tune import tune as _tune
    from cqd.experiments.tune import tune_grid

    if isinstance(config, (TuneConfig, GridConfig)):
        config = config if not overrides else config.model_dump()
    if isinstance(config, GridConfig):
        return tune_grid(config)
    if isinstance(config, TuneConfig):
        return _tune(config)
    data = config if isinstance(config, dict) else load_yaml(config)
    if isinstance(data, dict) and "columns" in data:
        return tune_grid(load_grid_config(config, list(overrides)))
    return _tune(load_tune_config(config, list(overrides)))


def sym(config: str | Path | dict, *overrides: str, force: bool = False) -> dict:
    """The sym-parameter table (`cqd sym`): one student conditioned on the quality mix c against K specialists;
    trains what is missing, scores it and writes `<out_dir>/report/sym.md`; returns {"markdown", "summary",
    "report_dir"}."""
    from cqd.analysis.symtable import load_sym_config, sym_table

    return sym_table(load_sym_config(config, list(overrides)), force=force)
