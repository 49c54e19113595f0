"""The `cqd` command. Every user mistake is one clear paragraph and a non-zero exit (--debug: traceback)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cqd.errors import CQDError

DEMO_SPECS = ["clutter", "lowres:size=8", "edges", "tps:grid=4,sigma=24", "clutter+lowres:size=12"]


def _common(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("--config", required=config_required, help="YAML config (see configs/)")
    p.add_argument("--data-dir", help="dataset folder (sets data.root)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. method.lam=50 train.epochs=3")


def _overrides(args) -> list[str]:
    extra = [f"data.root={args.data_dir}"] if getattr(args, "data_dir", None) else []
    return list(args.overrides) + extra


def cmd_train(args) -> int:
    from cqd.api import train

    res = train(args.config, *_overrides(args), resume=args.resume)
    print(json.dumps({k: res[k] for k in ("name", "method", "degradation", "acc_hq", "acc_lq", "wall_s", "images_per_s")}, indent=2))
    return 0


def cmd_eval(args) -> int:
    from cqd.api import evaluate

    print(json.dumps(evaluate(args.model, args.config, *_overrides(args)), indent=2))
    return 0


def cmd_show(args) -> int:
    from cqd.config import load_run_config
    from cqd.data import DATASETS
    from cqd.reports.figures import degradation_grid

    cfg = load_run_config(args.config, _overrides(args))
    ds = DATASETS.get(cfg.data.name)(cfg.data.root, "test", cfg.data.image_size, on_corrupt=cfg.data.on_corrupt)
    specs = args.specs or DEMO_SPECS
    out = degradation_grid(ds, specs, args.out, n=args.n, hq_view=cfg.data.hq_view, seed=cfg.data.seed)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cqd", description="Cross Quality Distillation: classifiers for degraded images.")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one method (hq, lq, augment, staged, cqd) as configured")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.ckpt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1 of a saved model.pt on the config's high- and low-quality test views")
    p.add_argument("--model", required=True, help="model.pt written by `cqd train`")
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("show-degradations", help="PNG grid: high-quality images, then one row per degradation")
    _common(p)
    p.add_argument("--specs", nargs="+", help=f"degradation specs (default: {' '.join(DEMO_SPECS)})")
    p.add_argument("--out", default="runs/degradations.png")
    p.add_argument("-n", type=int, default=8, help="images per row")
    p.set_defaults(func=cmd_show)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CQDError as e:
        if args.debug:
            raise
        print(f"cqd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cqd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
