"""Step cost with several teachers (not a test): prints a markdown table and writes JSON.

    python benchmarks/bench_ensemble.py [--out runs/bench] [--steps 20] [--repeats 3] [--batch 64]

Student resnet8; teachers resnet14, resnet20, wrn_16_2 (the first 1, 2 or 3); one process, random 32 px
images, the engine's optimizer and a method's step (forward, summed losses, backward, SGD step). With
fixed x (the default) the engine looks the teachers' logits and tapped maps up, so a step costs the
method alone: `cached` times that. `live` adds the teachers' forward passes each step (what a run
with `data.fresh_each_epoch` on the teachers' views, or `train.cache_teacher: false`, pays). Each as
ms per step and as a multiple of B (`lq`: CE on z only). The median of `--repeats` runs of `--steps`
steps counts (after 3 warm-up steps).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cqd.data.paired import Pair
from cqd.engine import phases as phase_opts
from cqd.engine.model_files import build_model
from cqd.engine.precision import flush_denormals
from cqd.engine.schema import run_config
from cqd.methods import METHODS, Step
from cqd.methods.base import freeze
from cqd.models.taps import FeatureTaps

TEACHERS = ["resnet14", "resnet20", "wrn_16_2"]
ROWS = [("B (lq)", "lq", 0), ("CQD", "cqd", 1), ("ENS", "ens", 2), ("ENS", "ens", 3), ("FT", "ft", 1),
        ("FEED", "feed", 1), ("FEED", "feed", 2), ("FEED", "feed", 3)]


def setup(name: str, k: int, batch: int):
    cfg = run_config({"model": "resnet8", "method": {"name": name}})
    torch.manual_seed(0)
    teachers = [freeze(build_model(t, 10, 1, False, True)) for t in TEACHERS[:k]]
    student = build_model("resnet8", 10, 1, False, True)
    method = METHODS.get(name)(student, cfg.method.params, teachers, torch.zeros(2, 1, 32, 32))
    taps = [FeatureTaps(t, layers) if layers else None for t, layers in zip(teachers, method.teacher_taps)]
    opt = phase_opts.build(method.phases(), cfg.train, 1000)["main"][0]
    x = torch.randn(batch, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    pair = Pair(x, x.clone(), torch.randint(0, 10, (batch,)), torch.zeros(batch, 4), torch.arange(batch))
    return method, teachers, taps, opt, pair


def teacher_outputs(teachers, taps, pair):
    with torch.no_grad():
        logits = [t(pair.x) for t in teachers]
    return logits, [dict(tp.out) if tp else {} for tp in taps]


def step_ms(method, teachers, taps, opt, pair, steps: int, live: bool) -> float:
    logits, features = teacher_outputs(teachers, taps, pair)
    spent = 0.0
    for i in range(3 + steps):
        t = time.perf_counter()
        if live:
            logits, features = teacher_outputs(teachers, taps, pair)
        _, losses = method(Step(pair, logits, features))
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        if i >= 3:
            spent += time.perf_counter() - t
    return 1000 * spent / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    rows = []
    with flush_denormals():
        for label, name, k in ROWS:
            parts = setup(name, k, a.batch)
            cached = statistics.median(step_ms(*parts, a.steps, False) for _ in range(a.repeats))
            live = statistics.median(step_ms(*parts, a.steps, True) for _ in range(a.repeats))
            rows.append({"row": label, "method": name, "teachers": k, "cached_ms": cached, "live_ms": live})
    b = rows[0]["cached_ms"]
    lines = ["| method | teachers | cached: ms/step | x B | live: ms/step | x B |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['teachers']} | {r['cached_ms']:.0f} | {r['cached_ms'] / b:.2f} | "
              f"{r['live_ms']:.0f} | {r['live_ms'] / b:.2f} |" for r in rows]
    print("\n".join(lines))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "batch": a.batch, "steps": a.steps, "repeats": a.repeats, "rows": rows}
    (out / "bench_ensemble.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
