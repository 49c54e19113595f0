"""The `cqd` command. Every user mistake is one clear paragraph and a non-zero exit (--debug: traceback).

Each command reads its config before it imports the engine or the figures, so a config error comes
before seconds of imports (torchvision, lightning_fabric, matplotlib); `cqd --help` imports none of them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from cqd.experiments.flags import add_executor_flags, executor_overrides

DEMO_SPECS = ["clutter:min_scale=0.5,max_scale=0.8", "lowres:size=8", "edges", "tps:grid=4,sigma=16",
              "clutter:min_scale=0.5,max_scale=0.8+lowres:size=12"]  # the columns of configs/quick.yaml


# What `cqd COMMAND --help` shows under "examples" (tests/test_cli_help.py runs each of them, made tiny)
EXAMPLES = {
    "train": ["cqd train --config lowres method.name=cqd method.cqd.lam=50",
              "cqd train --config lowres method.name=fitnet train.epochs=2 out_dir=runs/lowres_fitnet"],
    "eval": ["cqd eval --model runs/lowres/model.pt --config lowres data.degradation=lowres:size=4"],
    "export": ["cqd export --model runs/lowres/model.pt --format onnx"],
    "table": ["cqd table --config quick seeds=[0]"],
    "tune": ["cqd tune --config tune_lowres n_trials=2"],
    "show-degradations": ["cqd show-degradations --out runs/degradations.png -n 4"],
}


def _common(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("--config", required=config_required,
                   help="YAML config file, or a shipped preset by name (configs/NAME.yaml or NAME)")
    p.add_argument("--data-dir", help="dataset folder (sets data.root)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. method.cqd.lam=50 train.epochs=3")


def _command(sub, name: str, help: str, registries: bool = False) -> argparse.ArgumentParser:
    """A subcommand with its examples (and, for its own --help, the registered methods and tasks) as epilog."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[name]) if name in EXAMPLES else None
    if registries:
        epilog = (epilog + "\n\n" if epilog else "") + _registered()
    return sub.add_parser(name, help=help, description=help, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _registered() -> str:
    """The methods and tasks registered now (`method.name`, `task`), from the registries themselves."""
    from cqd.methods import METHODS
    from cqd.tasks import TASKS

    width = max(map(len, METHODS.names()))
    methods = "\n".join(f"  {n:<{width}}  {METHODS.get(n).label}" for n in METHODS.names())
    return f"methods (method.name):\n{methods}\n\ntasks (task): {', '.join(TASKS.names())}"


def _overrides(args, root_key: str = "data.root") -> list[str]:
    """The key=value overrides, with --data-dir as `root_key` (grids and studies: base.data.root)."""
    extra = [f"{root_key}={args.data_dir}"] if getattr(args, "data_dir", None) else []
    return list(args.overrides) + extra + executor_overrides(args)


def cmd_train(args) -> int:
    from cqd.engine.schema import load_run_config

    cfg = load_run_config(args.config, _overrides(args))
    from cqd.api import train

    res = train(cfg, resume=args.resume, force=args.force)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process returns; one prints
        from cqd.tasks import task_of

        keys = task_of(cfg).eval_keys
        print(json.dumps({k: res[k] for k in ("name", "method", *keys, "wall_s", "images_per_s")}, indent=2))
    return 0


def cmd_eval(args) -> int:
    from cqd.engine.schema import load_run_config

    cfg = load_run_config(args.config, _overrides(args))
    from cqd.api import evaluate

    print(json.dumps(evaluate(args.model, cfg, c=args.c), indent=2))
    return 0


def cmd_export(args) -> int:
    from cqd.api import export

    res = export(args.model, args.format, *_overrides(args), out=args.out, config=args.config, check=not args.no_check,
                 force=args.force)
    print(json.dumps(res, indent=2))
    return 0


def cmd_show(args) -> int:
    from cqd.engine.schema import load_run_config

    # `--specs` takes every word after it; the ones shaped key=value (no ':' before the '=', which every
    # spec with parameters has) are overrides typed after the specs
    words = args.specs or []
    args.specs = [w for w in words if not re.match(r"[A-Za-z_][\w.]*=", w)]
    args.overrides = [*args.overrides, *(w for w in words if w not in args.specs)]
    cfg = load_run_config(args.config, _overrides(args))
    from cqd.reports.figures import degradation_grid
    from cqd.tasks.classification.data import open_split

    ds = open_split(cfg.data, "test")  # (paired_folder: with its low-quality tree)
    specs = args.specs or DEMO_SPECS
    out = degradation_grid(ds, specs, args.out, n=args.n, hq_view=cfg.data.hq_view, seed=cfg.data.seed)
    print(f"wrote {out}")
    return 0


def _run_table(config: str, overrides: list[str], force: bool, wait: bool = True) -> int:
    import time

    from cqd.experiments.schema import load_grid_config

    grid = load_grid_config(config, overrides)
    from cqd.api import table
    from cqd.experiments.grid import plan
    from cqd.tasks import task_of

    total, t0 = len(plan(grid, Path(grid.out_dir))), time.perf_counter()
    task = task_of(grid.base)
    done = [0]

    def on_cell(name: str, res: dict) -> None:
        done[0] += 1
        print(f"[{done[0]}/{total} {time.perf_counter() - t0:5.0f}s] {name}: {task.progress(res)}", flush=True)

    out = table(grid, force=force, on_cell=on_cell, wait=wait)
    if out["submitted"]:
        print(f"{len(out['submitted'])} SLURM job(s) queued or running; run the same command again to collect them")
        return 0
    print("\n" + out["markdown"])
    written = ", ".join(sorted(f.name for f in Path(out["report_dir"]).iterdir() if f.name != "table.md"))
    print(f"report: {out['report_dir']}/table.md, {written} ({time.perf_counter() - t0:.0f}s)")
    return 0


def cmd_table(args) -> int:
    return _run_table(args.config, _overrides(args, "base.data.root"), args.force, not getattr(args, "no_wait", False))


def cmd_tune(args) -> int:
    from cqd.api import tune

    res = tune(args.config, *_overrides(args, "base.data.root"))
    from cqd.experiments.executors import describe_study

    for r in [res] if "study" in res else [r for by_row in res.values() for r in by_row.values()]:
        print(describe_study(r))
    return 0


def cmd_multires(args) -> int:
    from cqd.engine.schema import load_run_config

    cfg = load_run_config(args.config, _overrides(args))
    from cqd.analysis.multires import multires

    res = multires(cfg)
    q = res["router_accuracy"]
    print(f"\n{cfg.data.degradation}, {res['n_test']} test images per view (accuracy %):\n{res['table']}"
          f"quality predictor accuracy: {100 * q['hi']:.1f}% on x, {100 * q['lo']:.1f}% on z")
    print(f"wrote {Path(cfg.out_dir) / 'multires.md'} and {Path(cfg.out_dir) / 'multires.json'}")
    return 0


def cmd_sym(args) -> int:
    import time

    from cqd.analysis.symtable import load_sym_config

    cfg = load_sym_config(args.config, _overrides(args, "base.data.root"))
    from cqd.analysis.symtable import sym_table

    t0 = time.perf_counter()

    def on_cell(name: str, res: dict) -> None:
        print(f"[{time.perf_counter() - t0:5.0f}s] {name}: acc_lq={100 * (res.get('acc_lq') or 0):.1f}%", flush=True)

    out = sym_table(cfg, force=args.force, on_cell=on_cell)
    print("\n" + out["markdown"])
    print(f"report: {out['report_dir']}/sym.md, sym.json ({time.perf_counter() - t0:.0f}s)")
    return 0


def cmd_explain(args) -> int:
    from cqd.engine.schema import load_run_config

    cfg = load_run_config(args.config, _overrides(args))
    from cqd.analysis.saliency import explain

    res = explain(cfg, n=args.n)
    print(f"\n{res['n']} test images: mean tau_B={res['mean_tau_B']:.3f}, mean tau_CQD={res['mean_tau_CQD']:.3f}, "
          f"tau_CQD > tau_B on {100 * res['share_tau_CQD_above_B']:.1f}% of them")
    out = Path(cfg.out_dir)
    print(f"wrote {out / 'saliency.png'}, {out / 'tau_scatter.png'} and {out / 'tau.json'}")
    return 0


def cmd_robustness(args) -> int:
    from cqd.engine.schema import load_run_config

    words = [*args.models, *(args.specs or [])]  # key=value words typed after --models or --specs are overrides
    args.overrides = [*args.overrides, *(w for w in words if re.match(r"[A-Za-z_][\w.]*=", w))]
    models, specs = ([w for w in ws or [] if w not in args.overrides] for ws in (args.models, args.specs))
    cfg = load_run_config(args.config, _overrides(args))
    from cqd.api import robustness

    res = robustness(models, cfg, specs=specs or None, baseline=args.baseline, out=args.out)
    print("\n" + res["markdown"] + f"\nwrote {res['out']}/robustness.csv, .json, .md, .png")
    return 0


def cmd_predict(args) -> int:
    from cqd.api import predict
    from cqd.predict import write_predictions

    rows = predict(args.model, args.inputs, args.top_k, args.batch_size, args.device, args.strict)
    print(write_predictions(rows, args.out, args.format), end="")
    return 0


def build_parser(registries: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; `registries` names the command whose help lists the registered methods and tasks
    (only that help imports them: `cqd --help` stays light)."""
    ap = _Parser(prog="cqd", description="Cross Quality Distillation: classifiers for degraded images.")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return _command(sub, name, help, registries == name)

    p = command("train", "train one run of a method as configured (`cqd train --help` lists the methods)")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.ckpt")
    p.add_argument("--force", action="store_true", help="replace a finished run in out_dir (default: an error)")
    p.set_defaults(func=cmd_train)

    p = command("eval", "top-1 of a saved model.pt on the config's high- and low-quality test views")
    p.add_argument("--model", required=True, help="model.pt written by `cqd train`")
    p.add_argument("--c", help="the loss mix of an sgn SR student: K weights >= 0 summing to 1, e.g. 0.2,0.3,0.5 "
                               "(default: the mix it was trained at, when fixed)")
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = command("export", "a saved model.pt as ONNX, TorchScript or pt2, checked by running the written file")
    p.add_argument("--model", required=True, help="model.pt written by `cqd train`")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "pt2"],
                   help="onnx (fp32, or int8 QDQ for a QAT model), torchscript (fp32 only), "
                        "pt2 (torch.export; fp32 or int8)")
    p.add_argument("--out", help="output file (default: beside the model: model.onnx, model.ts.pt, model.pt2)")
    p.add_argument("--no-check", action="store_true", help="write without running the file on the test set")
    p.add_argument("--force", action="store_true", help="replace an existing --out file (never the model itself)")
    _common(p)
    p.set_defaults(func=cmd_export)

    p = command("table", "the paper's Table 1: methods x degradations x seeds, resumable")
    _common(p, config_required=True)
    p.add_argument("--force", action="store_true", help="redo cells that already have a result")
    add_executor_flags(p, no_wait=True)
    p.set_defaults(func=cmd_table)

    p = command("tune", "choose a method's settings (e.g. lambda, T, lr) on the validation split with Optuna")
    _common(p, config_required=True)
    add_executor_flags(p)
    p.set_defaults(func=cmd_tune)

    p = command("demo", "the quick Table 1 on the embedded Fashion-MNIST (a few minutes on 2 CPU cores)")
    _common(p)
    p.set_defaults(config="configs/quick.yaml")
    p.add_argument("--force", action="store_true", help="redo cells that already have a result")
    p.set_defaults(func=cmd_table)  # the quick preset

    p = command("show-degradations", "PNG grid: high-quality images, then one row per degradation")
    _common(p)
    p.add_argument("--specs", nargs="+", help=f"degradation specs (default: {' '.join(DEMO_SPECS)})")
    p.add_argument("--out", default="runs/degradations.png")
    p.add_argument("-n", type=_positive_int, default=8, help="images per row")
    p.set_defaults(func=cmd_show)

    p = command("multires", "multi-quality model (poster): route each test image to f or CQD by predicted quality")
    _common(p)
    p.set_defaults(func=cmd_multires)

    p = command("sym", "one student conditioned on the quality mix c vs K specialists (sym-parameters)")
    _common(p, config_required=True)
    p.add_argument("--force", action="store_true", help="redo runs and scores that already have a result")
    p.set_defaults(func=cmd_sym)

    p = command("explain", "input-gradient saliency of B and CQD, and tau, the share inside the box (Figure 4)")
    _common(p)
    p.add_argument("--n", type=int, default=1000, help="test images to compute tau on (default 1000)")
    p.set_defaults(func=cmd_explain)
    _after_training(command)
    return ap


def _after_training(command) -> None:
    """`cqd robustness` and `cqd predict`."""
    p = command("robustness", "top-1 and mCE of saved models under a sweep of degradations (table, CSV, figure)")
    p.add_argument("--models", nargs="+", required=True, help="model.pt files; the figure labels them by method")
    p.add_argument("--specs", nargs="+", help="degradation specs replacing the config's sweep (robustness:)")
    p.add_argument("--baseline", help="mCE's reference: one of the models (path or label; default: the first)")
    p.add_argument("--out", help="output folder (default: <out_dir>/robustness)")
    _common(p)
    p.set_defaults(func=cmd_robustness)

    p = command("predict", "top-k classes and probabilities of images by a model.pt or exported .onnx")
    p.add_argument("--model", required=True, help="model.pt written by `cqd train`, or a .onnx of `cqd export`")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders of images")
    p.add_argument("--top-k", type=_positive_int, default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda (model.pt only)")
    p.add_argument("--out", help="write to this file instead of stdout (.json: JSON)")
    p.add_argument("--format", choices=["csv", "json"], help="default: csv, or json for an --out ending in .json")
    p.add_argument("--strict", action="store_true", help="an unreadable image is an error (default: skipped)")
    p.set_defaults(func=cmd_predict)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in cqd's one-paragraph form, and a subcommand's options accepted
    anywhere on the line (plain argparse refuses `--n 8` after a key=value override)."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        # argparse calls this for the chosen subcommand; intermixed parsing cannot take subcommands
        # itself, and calls this again for each of its two passes (the flag stops the recursion)
        if self._subparsers is not None or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def error(self, message: str):
        self.exit(2, f"cqd: error: {message}\n(usage: {self.format_usage().strip().removeprefix('usage: ')}; "
                     f"`{self.prog} --help` explains the options)\n")


def main(argv: list[str] | None = None) -> int:
    """Run `cqd ...`; returns the exit code: 0 done, 2 bad input (one `cqd: error:` paragraph on
    stderr), 130 interrupted (the run saved last.ckpt), 1 a bug. `--debug` anywhere: tracebacks."""
    import warnings

    from cqd.errors import describe

    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    argv = [a for i, a in enumerate(argv) if i >= end or a != "--debug"]
    try:
        wants_help = any(a in ("-h", "--help") for a in argv[:end])
        listing = argv[0] if wants_help and argv and argv[0] in ("train", "table", "tune") else None
        args = build_parser(registries=listing).parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"cqd: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = show
            return args.func(args)
    except (Exception, KeyboardInterrupt) as e:
        if debug and not isinstance(e, KeyboardInterrupt):
            raise
        text, code = describe(e)
        print(text, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
