"""Speed of `cqd robustness` and `cqd predict` (not a test): images per second, and where the sweep's time goes.

    python benchmarks/bench_robustness.py [--n 5000] [--size 32] [--models 1] [--images 1000] [--threads N] [--data-dir DIR]

1. The sweep: every severity of every default family (lowres, blur, noise, jpeg: 5 each, those that fit
   `--size`) plus the clean test set, for `--models` resnet8 (random weights: speed does not depend on them) on
   the first `--n` Fashion-MNIST test items at `--size` px, at the default precision (`train.precision: auto`) and
   batch (`train.batch_size` 128, so evaluation batches of 256). Images/s counts model-images (items x specs x
   models); the split of the time is `timing` of robustness.json: making the degraded views (once per spec, shared
   by the models) against the models' forward passes.
2. `predict` on a folder of `--images` PNG files (Fashion-MNIST test items at 28 px, resized to `--size` by
   predict): images/s, decoding included, in batches of 64.
"""  # noqa: E501 - the usage line above is --help text, kept whole
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from cqd.analysis.robustness import robustness
from cqd.data import DATASETS
from cqd.engine.model_files import save_model
from cqd.engine.schema import run_config
from cqd.models import create_model
from cqd.predict import predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="test items of the sweep")
    ap.add_argument("--size", type=int, default=32, help="data.image_size")
    ap.add_argument("--models", type=int, default=1, help="resnet8 models swept together")
    ap.add_argument("--images", type=int, default=1000, help="PNG files for predict")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--data-dir", help="Fashion-MNIST folder (default: cqd's usual search)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_robustness_"))
    cfg = run_config({"out_dir": str(tmp / "run"), "model": "resnet8", "method": {"name": "lq"},
                      "data": {"root": args.data_dir, "image_size": args.size, "test_subset": args.n,
                               "degradation": "lowres:size=8"}, "train": {"progress": False}})
    ds = DATASETS.get("fashion_mnist")(args.data_dir, "test", args.size)
    paths = []
    for k in range(args.models):
        torch.manual_seed(k)
        path = tmp / f"m{k}" / "model.pt"
        meta = {"classes": list(ds.classes), "mean": list(ds.mean), "std": list(ds.std), "image_size": args.size}
        save_model(create_model("resnet8", num_classes=10, in_chans=1).eval(), cfg, 10, 1, path, meta=meta)
        paths.append(path)
    print(f"{platform.machine()} {platform.processor()}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), {'cuda' if torch.cuda.is_available() else 'cpu'}\n")

    res = robustness(paths, cfg, out=tmp / "robustness", log=lambda line: None)
    t = res["timing"]
    specs = len({r["spec"] for r in res["rows"]})
    made, fwd = t["views_s"], t["forward_s"]
    print(f"sweep: {len(paths)} resnet8 x {specs} specs (clean included) x {res['n_test']} items at {args.size} px "
          f"on {t['device']}: {t['total_s']:.1f} s, {t['images_per_s']:.0f} model-images/s; "
          f"degraded views {made:.1f} s ({100 * made / t['total_s']:.0f}%), forward passes {fwd:.1f} s "
          f"({100 * fwd / t['total_s']:.0f}%), rest (decoding once, setup, reports) "
          f"{t['total_s'] - made - fwd:.1f} s; test set decoded once: {t['decoded_once']}")

    small = DATASETS.get("fashion_mnist")(args.data_dir, "test", 28)
    folder = tmp / "images"
    folder.mkdir()
    for i in range(args.images):
        Image.fromarray(small.images[i % len(small), 0].numpy()).save(folder / f"{i:05d}.png")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    rows = predict(paths[0], [folder], top_k=5, batch_size=64, device=device)
    dt = time.perf_counter() - t0
    print(f"predict: {len(rows)} PNG files (28 px -> {args.size} px) on {device}: {dt:.1f} s, "
          f"{len(rows) / dt:.0f} images/s (model loading and decoding included)")
    print(f"(files in {tmp})")


if __name__ == "__main__":
    main()
