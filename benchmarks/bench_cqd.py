"""Speed measurements for cqd (not tests): prints a table and writes JSON.

    python benchmarks/bench_cqd.py [--out runs/bench] [--steps 100] [--repeats 3] [--device cpu|cuda]

Measures, in one run, on the same student, data and batch size:
  1. CQD epoch time / fine-tune (B) epoch time, cached teacher   (target <= 1.05); FitNet and
     attention transfer the same, with the teacher's feature maps cached and computed on the fly
  2. degradation time as a share of the training step time       (target < 5%): T run in the
     step (fresh twins each epoch) and fixed twins looked up (the default: made once before training)
  3. fp32 vs bf16-mixed, channels_last on/off: training images/s
  4. cached vs on-the-fly teacher: CQD training images/s
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cqd.data.paired import PairMaker
from cqd.degradations import parse_degradation
from cqd.engine.schema import run_config
from cqd.engine.trainer import train

SPECS = ["clutter:min_scale=0.5,max_scale=0.8", "lowres:size=8", "edges", "tps:grid=4,sigma=16",
         "clutter:min_scale=0.5,max_scale=0.8+lowres:size=12", "jpeg:quality=20", "blur", "noise"]


def base(out: Path, name: str, steps: int, device: str, **over) -> dict:
    cfg = {"name": name, "out_dir": str(out / name), "cache_dir": str(out / "cache"), "model": "resnet8",
           "data": {"train_subset": 64 * steps, "test_subset": 512, "degradation": "lowres:size=8"},
           "train": {"epochs": 2, "batch_size": 64, "lr": 0.1, "progress": False, "accelerator": device,
                     "precision": "32-true" if device == "cpu" else "bf16-mixed"},
           "method": {"name": "lq"}}
    for key, value in over.items():
        node = cfg
        *parents, last = key.split("__")
        for k in parents:
            node = node[k]
        node[last] = value
    return cfg


def run(cfg: dict) -> dict:
    """Train afresh; the second epoch's images/s (the first includes warm-up)."""
    out = Path(cfg["out_dir"])
    for f in ("result.json", "last.ckpt", "model.pt"):
        (out / f).unlink(missing_ok=True)
    res = train(run_config(cfg))
    return {"images_per_s": res["history"][-1]["images_per_s"], "epoch_s": 1 / res["history"][-1]["images_per_s"]}


def degradation_ms(spec: str, device: str, batch: int = 64, size: int = 32, reps: int = 20) -> float:
    T = parse_degradation(spec)
    T.bind((torch.rand(2048, 1, size, size) * 255).to(torch.uint8))
    x, idx = torch.rand(batch, 1, size, size, device=device), torch.arange(batch, device=device)
    T(x, idx)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        T(x, idx)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1000


def views_ms(spec: str, device: str, fixed: bool, batch: int = 64, size: int = 32, n: int = 2048,
             reps: int = 20) -> float:
    """ms per batch for PairMaker to make (x, z): T run per step, or fixed twins looked up."""
    maker = PairMaker(spec)
    if maker.T.needs_bank:
        maker.T.bind((torch.rand(2048, 1, size, size) * 255).to(torch.uint8))
    images = (torch.rand(n, 1, size, size) * 255).to(torch.uint8)
    def batches(order):
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            yield {"full": images[idx], "index": idx, "label": idx, "box": torch.zeros(len(idx), 4)}
    if fixed:
        maker.fix_twins(batches(torch.arange(n)), device, n)
    stream = list(batches(torch.randperm(n)))[:reps]
    maker.views(stream[0], device)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for b in stream:
        maker.views(b, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / len(stream) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--steps", type=int, default=100, help="training steps per epoch in each measurement")
    ap.add_argument("--repeats", type=int, default=3, help="runs of B and CQD each (the median counts)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods-only", action="store_true",
                    help="only the epoch-time ratios (skip degradations and precision)")
    args = ap.parse_args()
    out, dev, steps = Path(args.out), args.device, args.steps
    results: dict = {"device": (torch.cuda.get_device_name() if dev == "cuda"
                                else platform.processor() or platform.machine()),
                     "torch": torch.__version__, "threads": torch.get_num_threads(), "steps_per_epoch": steps}

    teacher = base(out, "teacher", steps, dev, method__name="hq")
    train(run_config(teacher))
    tpath = str(out / "teacher" / "model.pt")
    # B and CQD alternate, `--repeats` times each, and the median counts: CPU timings drift by ~10%
    kinds = {"B": {}, "cqd_cached": {"method__name": "cqd"},
             "cqd_on_the_fly": {"method__name": "cqd", "train__cache_teacher": False},
             "fitnet_cached": {"method__name": "fitnet"},
             "fitnet_on_the_fly": {"method__name": "fitnet", "train__feature_cache_mb": 0},
             "at_cached": {"method__name": "at"}, "at_on_the_fly": {"method__name": "at", "train__feature_cache_mb": 0}}
    runs: dict[str, list] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind, over in kinds.items():
            teacher = {"teacher": {"checkpoint": tpath}} if kind != "B" else {}
            runs[kind].append(run(base(out, kind, steps, dev, **teacher, **over)))
    median = {k: sorted(r, key=lambda m: m["epoch_s"])[len(r) // 2] for k, r in runs.items()}
    b, cqd_cached, cqd_fly = median["B"], median["cqd_cached"], median["cqd_on_the_fly"]
    results["over_B_epoch_time"] = {k: m["epoch_s"] / b["epoch_s"] for k, m in median.items() if k != "B"}
    results["images_per_s"] = {k: m["images_per_s"] for k, m in median.items()}
    results["cqd_over_B_epoch_time"] = cqd_cached["epoch_s"] / b["epoch_s"]
    results["B_images_per_s"] = b["images_per_s"]
    results["cqd_cached_images_per_s"] = cqd_cached["images_per_s"]
    results["cqd_on_the_fly_images_per_s"] = cqd_fly["images_per_s"]

    if args.methods_only:
        _report(results, out, b, cqd_cached, cqd_fly, None)
        return
    step_ms = 64 / b["images_per_s"] * 1000
    results["step_ms"] = step_ms
    results["degradation_ms"] = {s: degradation_ms(s, dev) for s in SPECS}
    results["degradation_share_of_step"] = {s: ms / step_ms for s, ms in results["degradation_ms"].items()}
    results["fixed_twin_lookup_ms"] = {s: views_ms(s, dev, fixed=True) - views_ms("none", dev, fixed=False)
                                       for s in SPECS}
    results["fixed_twin_lookup_share_of_step"] = {s: ms / step_ms for s, ms in results["fixed_twin_lookup_ms"].items()}

    prec = {}
    for p in ("32-true", "bf16-mixed"):
        for cl in (False, True):
            key = f"{p}{' + channels_last' if cl else ''}"
            prec[key] = run(base(out, f"prec_{p}_{cl}", steps, dev,
                                 train__precision=p, train__channels_last=cl))["images_per_s"]
    results["precision_images_per_s"] = prec

    _report(results, out, b, cqd_cached, cqd_fly, prec)


def _report(results: dict, out: Path, b: dict, cqd_cached: dict, cqd_fly: dict, prec: dict | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    print(f"\ndevice: {results['device']}  torch {results['torch']}  threads {results['threads']}  "
          "resnet8, 32 px, batch 64")
    print("| measurement | value | target |\n|---|---|---|")
    print(f"| CQD (cached f) epoch time / B epoch time | {results['cqd_over_B_epoch_time']:.3f} | <= 1.05 |")
    for k, v in results["over_B_epoch_time"].items():
        if not k.startswith("cqd"):
            print(f"| {k} epoch time / B epoch time ({results['images_per_s'][k]:.0f} images/s) | {v:.3f} | |")
    print(f"| B training images/s | {b['images_per_s']:.0f} | |")
    print(f"| CQD cached teacher images/s | {cqd_cached['images_per_s']:.0f} | |")
    print(f"| CQD on-the-fly teacher images/s | {cqd_fly['images_per_s']:.0f} | |")
    if prec is not None:
        print("| degradation: ms per batch and share of a step, made per step (`fresh_each_epoch`) / fixed twins "
          "(default: made once before training, then looked up) | | < 5% |")
    for s in (SPECS if prec is not None else ()):
        print(f"| `{s}` | {results['degradation_ms'][s]:.2f} ms {100 * results['degradation_share_of_step'][s]:.1f}% / "
              f"{results['fixed_twin_lookup_ms'][s]:.2f} ms "
              f"{100 * results['fixed_twin_lookup_share_of_step'][s]:.1f}% | |")
    for k, v in (prec or {}).items():
        print(f"| training images/s, {k} | {v:.0f} | |")
    print(f"\nwrote {out / 'bench.json'}")


if __name__ == "__main__":
    main()
