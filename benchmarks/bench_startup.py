"""Start-up time of cqd's commands (not a test): prints wall times, the slowest imports, and which heavy
packages each command loads.

    python benchmarks/bench_startup.py [--repeats 3] [--top 10]

Each command runs in a fresh `python` process, best of `--repeats` after one warm-up run (which also
writes the bytecode caches, even where PYTHONDONTWRITEBYTECODE is set in this shell):
  1. `import cqd.engine.trainer` (what every training process pays before its first step), `cqd --help`,
     a config error and `import cqd.config`, with the heavy packages each one imported (`cqd --help` and
     a config error need no engine)
  2. the floor: `import torch, torchvision` alone, which any torchvision program pays (on a slow CPU it is
     already above the issue's 1.5 s target), and what cqd adds on top of it
  3. the `--top` entries of `python -X importtime -c "import cqd.engine.trainer"` by cumulative time
     (a chain of modules importing each other shows as one row each), and self time by package
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HEAVY = ["torch", "lightning", "lightning_fabric", "lightning.pytorch", "torchmetrics", "torchvision", "kornia",
         "scipy", "matplotlib"]  # torchmetrics: lightning_fabric imports it when installed (its version check)
COMMANDS = {  # name: python code run with `python -c` (what the command runs)
    "import cqd.engine.trainer": "import cqd.engine.trainer",
    "cqd --help": "from cqd.cli import main; sys.argv = ['cqd', '--help']; main()",
    "cqd train train.epochs=0 (a config error)":
        "from cqd.cli import main; sys.argv = ['cqd', 'train', 'train.epochs=0']; main()",
    "import cqd.config (what reading a config imports)": "import cqd.config",
}
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(code: str, repeats: int) -> tuple[float, list[str]]:
    """Best wall time of `python -c code` over `repeats` runs after a warm-up, and the HEAVY modules it loaded."""
    report = f"\nimport json\nprint('@@heavy', json.dumps([m for m in {HEAVY} if m in sys.modules]))"
    times, out = [], ""
    for i in range(repeats + 1):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", "import sys\n" + code + report], env=ENV, capture_output=True,
                             text=True, check=False).stdout
        if i:
            times.append(time.perf_counter() - t)
    return min(times), json.loads(out.rpartition("@@heavy ")[2])


def importtimes(code: str) -> list[tuple[float, float, str]]:
    """(cumulative s, self s, module) of every import `code` makes, nested ones included."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=ENV, capture_output=True,
                         text=True, check=False).stderr
    rows = []
    for line in err.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            own, total, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
            rows.append((int(total) / 1e6, int(own) / 1e6, name))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, best of {args.repeats}\n")
    print("| command | wall s | heavy packages imported |\n|---|---|---|")
    for name, code in COMMANDS.items():
        wall, heavy = timed(code, args.repeats)
        print(f"| `{name}` | {wall:.2f} | {', '.join(heavy) or 'none'} |", flush=True)

    floor, _ = timed("import torch, torchvision", args.repeats)
    trainer, _ = timed(COMMANDS["import cqd.engine.trainer"], args.repeats)
    print(f"\n`import torch, torchvision`: {floor:.2f} s; "
          f"`import cqd.engine.trainer` adds {trainer - floor:.2f} s to it")

    rows = importtimes(COMMANDS["import cqd.engine.trainer"])
    print(f"\n`python -X importtime -c \"import cqd.engine.trainer\"`, top {args.top} by cumulative time "
          "(a module's own imports included):\n")
    print("| cumulative s | self s | module |\n|---|---|---|")
    for total, own, name in sorted(rows, reverse=True)[: args.top]:
        print(f"| {total:.3f} | {own:.3f} | `{name}` |")
    packages: dict[str, float] = {}
    for _, own, name in rows:
        packages[name.split(".")[0]] = packages.get(name.split(".")[0], 0.0) + own
    print(f"\nthe same, self time summed by top-level package (all: {sum(packages.values()):.2f} s):\n")
    print("| package | self s |\n|---|---|")
    for name, own in sorted(packages.items(), key=lambda kv: kv[1], reverse=True)[: args.top]:
        print(f"| `{name}` | {own:.2f} |")


if __name__ == "__main__":
    main()
