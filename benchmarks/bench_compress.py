"""Size and CPU latency of small students, fp32 vs pruned vs int8 (not a test): prints a markdown table, writes JSON.

    python benchmarks/bench_compress.py [--out runs/bench] [--models resnet8 wrn_16_2 timm:resnet10t]
                                        [--ratio 0.5] [--size 32] [--repeats 30] [--threads 1]

For each model, side by side in one process, on random weights (latency and size do not depend on training):
  fp32          the model as built
  pruned        Torch-Pruning, `--ratio` of every layer's channels removed (as `compress.prune`)
  int8          torchao PT2E QAT graph (as `compress.qat`), observers set by 8 batches, converted to int8
  pruned+int8   both
Each is exported to ONNX as `cqd export` does (the int8 ones as QDQ) and timed with onnxruntime (CPU,
`--threads` intra-op threads) at batch 1 and 64: the median of `--repeats` runs after 3 warm-up runs.
PyTorch eager fp32 latency of the same networks is given beside (one thread as well). Parameters count
the network's weights (an int8 model has as many, at a quarter of the bytes each); file size is the ONNX file's.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cqd.compress import qat
from cqd.compress.pruning import Pruner, count_params
from cqd.engine.schema import run_config
from cqd.export import _write, latency_ms, runner
from cqd.models import create_model


def variants(name: str, ratio: float, chw):
    """(label, network, form) for fp32, pruned, int8 and pruned+int8."""
    def build(prune: bool):
        torch.manual_seed(0)
        m = create_model(name, num_classes=10, in_chans=chw[0])
        if prune:
            cfg = run_config({"compress": {"prune": {"ratio": ratio}}}).compress.prune
            Pruner(m, cfg, torch.randn(2, *chw), lambda n: []).step()
        return m

    def int8(m):
        g = qat.prepare(m, chw)
        g.train()
        with torch.no_grad():
            for _ in range(8):
                g(torch.randn(16, *chw))
        return qat.convert(g)

    for prune in (False, True):
        m = build(prune)
        params = count_params(m)
        yield ("pruned" if prune else "fp32"), m.eval(), params, "fp32"
        yield ("pruned+int8" if prune else "int8"), int8(m), params, "int8"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--models", nargs="+", default=["resnet8", "wrn_16_2", "timm:resnet10t"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chw = (1, args.size, args.size)
    rows = []
    for name in args.models:
        for label, net, params, form in variants(name, args.ratio, chw):
            path = out / f"bench_compress_{name.replace(':', '_')}_{label}.onnx"
            t0 = time.perf_counter()
            _write(net, "onnx", torch.randn(2, *chw), path)
            export_s = time.perf_counter() - t0
            run = runner(path, "onnx", threads=args.threads)
            ort = {b: latency_ms(run, chw, b, args.repeats) for b in (1, 64)}
            eager = {}
            if form == "fp32":
                with torch.no_grad():
                    eager = {b: latency_ms(lambda x: net(torch.from_numpy(x)), chw, b, args.repeats) for b in (1, 64)}
            rows.append({"model": name, "variant": label, "form": form, "params": params,
                         "onnx_kb": path.stat().st_size / 1024, "ort_ms": ort, "eager_ms": eager,
                         "export_s": export_s})
            print(f"{name} {label}: {params} params, {path.stat().st_size / 1024:.0f} KB, "
                  f"ORT {ort[1]:.2f} / {ort[64]:.2f} ms", flush=True)
    base = {r["model"]: r for r in rows if r["variant"] == "fp32"}
    lines = [f"\nCPU latency and size ({platform.processor() or platform.machine()}, {args.size} px, 1 channel, "
             f"{args.threads} thread(s), median of {args.repeats}; pruning ratio {args.ratio})\n",
             "| model | variant | params | ONNX KB | ORT ms @1 | ORT ms @64 | x fp32 @64 "
             "| eager ms @1 | eager ms @64 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["eager_ms"]
        lines.append(f"| {r['model']} | {r['variant']} | {r['params']:,} | {r['onnx_kb']:.0f} | {r['ort_ms'][1]:.2f} | "
                     f"{r['ort_ms'][64]:.2f} | {base[r['model']]['ort_ms'][64] / r['ort_ms'][64]:.2f} | "
                     f"{e.get(1, float('nan')):.2f} | {e.get(64, float('nan')):.2f} |")
    md = "\n".join(lines)
    print(md)
    (out / "bench_compress.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1, default=str))
    (out / "bench_compress.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
