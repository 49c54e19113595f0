"""Speed of online distillation (not a test): prints a markdown table and writes JSON.

    python benchmarks/bench_online.py [--out runs/bench] [--steps 20] [--repeats 3] [--batch 64]

For each group of networks of configs/online.yaml's columns (resnet8 + resnet8, resnet8 + wrn_16_2,
resnet8 + resnet14 + wrn_16_2), one process, the engine's optimizers and step (each phase: forward,
summed losses, backward, optimizer step), on random 32 px images:
  1. ms per training step of DML and AFD, and as a multiple of training the same networks alone
     (`dml` with lam 0: each network's CE only, the same forward and backward passes as K separate runs)
  2. how AFD's step splits: the networks' phases (main: CE + DML term; adv: the adversarial update of
     the networks and transfer layers, whose backward also runs through the discriminators) and the
     discriminators' phase (disc: L_D on the adv phase's maps)
The median of `--repeats` measurements of `--steps` steps counts (after 3 warm-up steps).
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

GROUPS = {"resnet8 + resnet8": ["resnet8"], "resnet8 + wrn_16_2": ["wrn_16_2"],
          "resnet8 + resnet14 + wrn_16_2": ["resnet14", "wrn_16_2"]}
ROWS = {"alone": ("dml", {"lam": 0.0}), "DML": ("dml", {}), "AFD": ("afd", {})}


def method_for(name: str, params: dict, peers: list[str]):
    cfg = run_config({"model": "resnet8",
                      "method": {"name": name, name: {"k": len(peers) + 1, "models": peers, **params}}})
    torch.manual_seed(0)
    student = build_model("resnet8", 10, 1, False, cfg.train.channels_last)
    method = METHODS.get(name)(student, cfg.method.params, (), torch.zeros(2, 1, 32, 32))
    built = phase_opts.build(method.phases(), cfg.train, 1000)
    return method, {k: opt for k, (opt, _) in built.items()}


def step_ms(method, opts: dict, pair: Pair, steps: int) -> dict[str, float]:
    """ms per step of each phase, averaged over `steps` steps (after 3 warm-up steps)."""
    spent = {k: 0.0 for k in opts}
    for i in range(3 + steps):
        for name, opt in opts.items():
            t = time.perf_counter()
            _, losses = method(Step(pair, phase=name))
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()
            if i >= 3:
                spent[name] += time.perf_counter() - t
    return {k: 1000 * v / steps for k, v in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, 32, 32, generator=g)
    pair = Pair(x, x, torch.randint(0, 10, (args.batch,), generator=g), torch.zeros(args.batch, 4),
                torch.arange(args.batch))
    results = {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
               "groups": {}}
    with flush_denormals():
        for group, peers in GROUPS.items():
            built = {row: method_for(name, params, peers) for row, (name, params) in ROWS.items()}
            runs = {row: [] for row in ROWS}
            for _ in range(args.repeats):  # interleaved, so a slow spell of a shared CPU hits every row alike
                for row, (method, opts) in built.items():
                    runs[row].append(step_ms(method, opts, pair, args.steps))
            median = {row: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for row, rs in runs.items()}
            results["groups"][group] = median
            print(f"{group}: " + ", ".join(f"{row} {sum(m.values()):.0f} ms" for row, m in median.items()), flush=True)
    _report(results, Path(args.out))


def _report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_online.json").write_text(json.dumps(results, indent=2))
    print(f"\ndevice: {results['device']}  torch {results['torch']}  threads {results['threads']}  "
          f"32 px, batch {results['batch']}, one process, fp32; ms per training step (median of {results['repeats']})")
    print("| networks | alone | DML | AFD | DML / alone | AFD / alone "
          "| AFD: networks (main + adv) | AFD: discriminators (disc) |")
    print("|---|---|---|---|---|---|---|---|")
    for group, m in results["groups"].items():
        alone, dml, afd = (sum(m[row].values()) for row in ROWS)
        a = m["AFD"]
        print(f"| {group} | {alone:.0f} | {dml:.0f} | {afd:.0f} | {dml / alone:.2f} | {afd / alone:.2f} | "
              f"{a['main']:.0f} + {a['adv']:.0f} ms ({100 * (a['main'] + a['adv']) / afd:.0f}%) | "
              f"{a['disc']:.1f} ms ({100 * a['disc'] / afd:.0f}%) |")
    print(f"\nwrote {out / 'bench_online.json'}")


if __name__ == "__main__":
    main()
