"""Speed of super-resolution training (not a test): prints a markdown table and writes JSON.

    python benchmarks/bench_sr.py [--config configs/sr_x4.yaml] [--out runs/bench] [--steps 10] [--repeats 3]

With the config's patches (sr.patch LR px, train.batch_size patches per step) from its training images,
one process, the engine's optimizer and method step (forward, summed losses, backward, Adam step):
  1. patches/s of training the teacher size (method sr_teacher on the teacher's model), the student size
     alone (sr_l1) and the student distilled by LSFD (the teacher's forward and taps included, as the engine
     runs it each step: new patches every step, nothing to cache), in float32 and in bf16 autocast
  2. the share of a step spent making the patches (PatchMaker: crop, flip/rotate, to float on the device)
The median of `--repeats` measurements of `--steps` steps counts (after 2 warm-up steps).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cqd.engine import phases as phase_opts
from cqd.engine.model_files import build_model
from cqd.engine.schema import load_run_config
from cqd.methods import METHODS, Step
from cqd.methods.base import freeze
from cqd.models.taps import FeatureTaps
from cqd.tasks.sr import pipeline as sr
from cqd.tasks.sr.data import SRImages


def setup(cfg, method_name: str, model: str, teacher: str | None):
    torch.manual_seed(0)
    student = build_model(sr.model_name(cfg, model), 3, 3, False, cfg.train.channels_last)
    sample = torch.zeros(2, 3, cfg.sr.patch, cfg.sr.patch)
    f = None if teacher is None else freeze(build_model(sr.model_name(cfg, teacher), 3, 3, False,
                                                        cfg.train.channels_last))
    cls = METHODS.get(method_name)
    method = cls(student, getattr(cfg.method, method_name, None) or cls.Params(), [f] if f is not None else (), sample)
    taps = FeatureTaps(f, method.teacher_taps[0]) if f is not None and method.teacher_taps[0] else None
    opt, _ = phase_opts.build(method.phases(), cfg.train, 1000)["main"]
    return method, opt, f, taps


def measure(cfg, maker, method, opt, teacher, taps, steps: int, bf16: bool) -> tuple[float, float]:
    """(patches per second, share of the time spent making patches) over `steps` steps after 2 warm-up steps."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    b = cfg.train.batch_size
    make_s = total_s = 0.0
    for i in range(2 + steps):
        t0 = time.perf_counter()
        pair = maker({"index": torch.arange(i * b, (i + 1) * b)}, "cpu", epoch=0)
        t1 = time.perf_counter()
        logits, features = [], []
        with autocast:
            if teacher is not None:
                with torch.no_grad():
                    logits = [teacher(pair.z).float()]
                features = [{k: v.float() for k, v in taps.out.items()}] if taps else [{}]
            _, losses = method(Step(pair, logits, features))
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= 2:
            make_s += t1 - t0
            total_s += t2 - t0
    return steps * b / total_s, make_s / total_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/sr_x4.yaml")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_run_config(args.config)
    maker = sr.PatchMaker(cfg, SRImages(cfg.sr, "train"))
    teacher = cfg.teacher.model
    rows = {f"teacher {teacher} (sr_teacher)": ("sr_teacher", teacher, None),
            f"student {cfg.model} alone (sr_l1)": ("sr_l1", cfg.model, None),
            f"student {cfg.model} + LSFD from the teacher": ("lsfd", cfg.model, teacher)}
    results = []
    for label, (name, model, t) in rows.items():
        for bf16 in (False, True):
            method, opt, f, taps = setup(cfg, name, model, t)
            runs = [measure(cfg, maker, method, opt, f, taps, args.steps, bf16) for _ in range(args.repeats)]
            speed = statistics.median(r[0] for r in runs)
            share = statistics.median(r[1] for r in runs)
            results.append({"run": label, "precision": "bf16-mixed" if bf16 else "32-true", "patches_per_s": speed,
                            "patch_share": share})
    head = (f"x{cfg.sr.scale}, LR patches {cfg.sr.patch} px, batch {cfg.train.batch_size}, torch threads "
            f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    lines = [head, "", "| run | precision | patches/s | making patches (share of a step) |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['precision']} | {r['patches_per_s']:.1f} | {100 * r['patch_share']:.2f}% |"
              for r in results]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_sr_x{cfg.sr.scale}.json").write_text(json.dumps({"setting": head, "results": results}, indent=2))


if __name__ == "__main__":
    main()
