#!/usr/bin/env python3
"""Files written by an older cqd still load and resume with a newer one, to the same numbers.

  python scripts/check_old_files.py OLD_SIDE OLD_SRC NEW_SRC [WORK]

OLD_SIDE is the old side of scripts/compare_commits.sh (its run folders: quick, fitnet, sr, ...), made by the
cqd in OLD_SRC (a folder holding cqd/); NEW_SRC is the newer cqd. In copies of those folders (under WORK,
default /tmp/check-old-files):
  1. the finished quick grid, run again by the new cqd, trains nothing (no cell or teacher file changes) and
     writes the same table.md;
  2. an old run's last.ckpt (fitnet: a teacher, a regressor, two phases' state; sr: task sr) resumed for one
     more epoch (train.epochs=3) by the old and by the new cqd gives the same metrics.csv (but timings; the new
     side is given the legacy values of keys whose defaults changed since: LEGACY);
  3. an old model.pt evaluated by the old and by the new cqd gives the same numbers.
Exit status 0 when all hold, 1 otherwise. Imports no cqd: each command runs with PYTHONPATH set to a side.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare_runs import RUNS, TIMING  # noqa: E402  (the same runs and the same idea of a timing column)

ARGS = dict(RUNS)
# Defaults that changed since (issue 31: the reference implementations' conventions): an old last.ckpt resumes under
# the legacy value it was made under, which the new side is given (the old side does not know these keys).
LEGACY = {"fitnet": ["method.fitnet.convention=cqd_v1"], "sr": ["sr.resize=pil"]}


def cqd(src: Path, args: list[str], log: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "cqd", *args], env=env, capture_output=True, text=True)
    log.write_text(p.stdout + p.stderr)
    if p.returncode:
        raise SystemExit(f"FAILED: cqd {' '.join(args)} (exit {p.returncode}); see {log}")
    return p.stdout + p.stderr


def fill(args: list[str], run: Path, cache: Path) -> list[str]:
    return [a.replace("{run}", str(run)).replace("{cache}", str(cache)) for a in args]


def metrics(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: v for k, v in row.items() if not TIMING.search(k)} for row in csv.DictReader(f)]


def stamps(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and "report" not in p.parts and p.name != "grid.json"}


def check_grid(old_side: Path, new: Path, work: Path) -> list[str]:
    grid = work / "quick"
    shutil.copytree(old_side / "quick", grid)
    before = stamps(grid)
    out = cqd(new, fill(ARGS["quick"], grid, work / "cache-grid"), work / "quick.log")
    changed = [k for k, t in stamps(grid).items() if before.get(k) != t]
    same = (grid / "report" / "table.md").read_text() == (old_side / "quick" / "report" / "table.md").read_text()
    trained = [line for line in out.splitlines() if " epoch " in line and "/" in line]
    print(f"grid: {len(before)} files of the finished old grid, {len(changed)} changed, "
          f"{len(trained)} training lines, table.md {'identical' if same else 'DIFFERS'}")
    return [f"grid: {changed[:5]} changed" for _ in [0] if changed] + \
        (["grid: table.md differs"] if not same else []) + (["grid: trained again"] if trained else [])


def check_resume(old_side: Path, old: Path, new: Path, work: Path, name: str) -> list[str]:
    rows = {}
    for side, src in (("old", old), ("new", new)):
        run = work / f"{name}-{side}"
        shutil.copytree(old_side / name, run)
        legacy = LEGACY.get(name, []) if side == "new" else []
        cqd(src, fill(ARGS[name], run, work / f"cache-{name}-{side}") + legacy + ["train.epochs=3", "--resume"],
            work / f"{name}-{side}.log")
        rows[side] = metrics(run / "metrics.csv")
    same = rows["old"] == rows["new"] and len(rows["new"]) == 3
    print(f"resume {name}: old last.ckpt, 3rd epoch by the old and the new cqd: "
          f"{'identical' if same else 'DIFFERS'} ({len(rows['new'])} epochs)")
    return [] if same else [f"resume {name}: {rows['old'][-1:]} vs {rows['new'][-1:]}"]


def last_json(text: str) -> dict:
    """The JSON object a command printed last (`cqd eval` prints its result after its log lines)."""
    start = text.rindex("\n{") + 1 if "\n{" in text else text.index("{")
    return json.loads(text[start:])


def check_eval(old_side: Path, old: Path, new: Path, work: Path) -> list[str]:
    args = ["eval", "--model", str(old_side / "fitnet" / "model.pt"), "--config", "lowres",
            "data.test_subset=128", "train.precision=32-true"]
    got = {side: last_json(cqd(src, args, work / f"eval-{side}.log")) for side, src in (("old", old), ("new", new))}
    keys = ("acc_hq", "acc_lq", "n_test")
    same = all(got["old"].get(k) == got["new"].get(k) for k in keys)
    new_vals = {k: got["new"].get(k) for k in keys}
    old_vals = {k: got["old"].get(k) for k in keys}
    print(f"eval of an old model.pt: {new_vals}; {'identical' if same else f'DIFFERS from {old_vals}'}")
    return [] if same else ["eval differs"]


def main() -> int:
    old_side, old, new = (Path(a).resolve() for a in sys.argv[1:4])
    work = Path(sys.argv[4] if len(sys.argv) > 4 else "/tmp/check-old-files")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bad = check_grid(old_side, new, work)
    for name in ("fitnet", "sr"):
        bad += check_resume(old_side, old, new, work, name)
    bad += check_eval(old_side, old, new, work)
    print("old files: all load, resume and evaluate the same" if not bad else "PROBLEMS:\n  " + "\n  ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
