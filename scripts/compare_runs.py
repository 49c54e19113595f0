#!/usr/bin/env python3
"""The runs of scripts/compare_commits.sh, and the comparison of every number they write.

  python scripts/compare_runs.py runs                        the run list (name, cqd arguments)
  python scripts/compare_runs.py marker COMMIT               the marker a reusable old side carries
  python scripts/compare_runs.py run SIDE_DIR SRC [--marker TEXT]
        train every run with the cqd of SRC (a folder holding cqd/) into SIDE_DIR/<run>, one after
        another, OMP_NUM_THREADS=1; logs in SIDE_DIR/logs/<run>.log, exit codes in SIDE_DIR/status.tsv;
        when every run succeeded, TEXT is written to SIDE_DIR/.compare-marker
  python scripts/compare_runs.py compare OLD_DIR NEW_DIR   every number, exit 1 if any differs or any run failed
COMPARE_RUNS="feed sgn" (names of the list, space- or comma-separated) restricts every command to those runs.

Compared: every result.json and metrics.csv under each run's folder (cells, teachers, rounds), matched by
their path relative to the side's folder. result.json: every value, nested values (history, compress, ...)
by dotted path, except `config` (the config dump: its schema may change without changing a number), timing
fields and paths. metrics.csv: every cell of every column except timing columns; cells are equal when their
text is equal or both read as the same float. Timing: images_per_s, *_s, and any name with wall, seconds or
time. Paths: strings that start with '/'.

This script imports no cqd and no torch: each `cqd` command runs in a child process whose PYTHONPATH is SRC.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# --- the runs ------------------------------------------------------------------------------------------------
# {run}: the run's folder, {cache}: the side's cache folder. Only documented keys, as overrides on shipped
# presets: method.<name>.*, data.*, train.*, teachers, compress.*, sr.* (task sr only).
TINY = ["data.train_subset=256", "data.test_subset=128", "train.epochs=2", "train.batch_size=64",
        "train.precision=32-true", "train.progress=false"]
CLS = ["train", "--config", "lowres", "out_dir={run}", "cache_dir={cache}", *TINY]
SR = ["sr.train=[text, clock]", "sr.test=[page]", "sr.patch=12", "sr.patches_per_epoch=64", "sr.teacher_epochs=1",
      "train.epochs=2", "train.precision=32-true", "train.progress=false"]
RUNS: list[tuple[str, list[str]]] = [
    # Table 1, quick preset: 5 columns x 5 rows and the shared teacher
    ("quick", ["table", "--config", "quick", "out_dir={run}", "base.cache_dir={cache}",
               "base.train.precision=32-true"]),
    ("fitnet", [*CLS, "method.name=fitnet"]),
    ("afd", [*CLS, "method.name=afd"]),  # online: two networks trained together, no teacher
    ("feed", [*CLS, "method.name=feed", "teachers=[{model: resnet8, seed: 1}, {model: resnet14}]"]),
    ("symcqd", [*CLS, "method.name=symcqd", "data.mix.degradations=[lowres:size=8, blur:sigma=1.5]"]),
    ("compress", [*CLS, "method.name=cqd", "method.init=teacher", "compress.prune.ratio=0.5", "compress.qat=true"]),
    ("sr", ["train", "--config", "sr_x2", "out_dir={run}", "cache_dir={cache}", "method.name=lsfd", *SR]),
    ("sgn", ["train", "--config", "sr_x4", "out_dir={run}", "cache_dir={cache}", "method.name=sgn", *SR]),
]
if os.environ.get("COMPARE_RUNS"):  # a subset, e.g. COMPARE_RUNS="feed sgn" (the marker records the list)
    _only = os.environ["COMPARE_RUNS"].replace(",", " ").split()
    _bad = sorted(set(_only) - {name for name, _ in RUNS})
    if _bad:
        sys.exit(f"compare_runs.py: COMPARE_RUNS names unknown runs {_bad}; the runs: {[name for name, _ in RUNS]}")
    RUNS = [(name, args) for name, args in RUNS if name in _only]

STATUS, MARKER, LOGS = "status.tsv", ".compare-marker", "logs"
RESULT, METRICS = "result.json", "metrics.csv"
SKIP_TOP = {"config"}  # result.json keys not compared (besides timing and paths)
TIMING = re.compile(r"wall|seconds|time|^images_per_s$|_s$")
SHOW = 12  # differing values shown per run folder


def runs_digest() -> str:
    return hashlib.sha256(json.dumps(RUNS).encode()).hexdigest()[:16]


def env_digest() -> str:
    """Python and the installed dependencies of cqd (name==version of each distribution cqd requires, with
    their own requirements, transitively; no extras): a reused old side must have been trained with the
    same ones. Packages cqd does not need (linters, docs tools) may come and go."""
    from importlib import metadata

    def name_of(req: str) -> str:
        return re.split(r"[\s\[<>=!~;(@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")

    own = [name_of(d) for d in metadata.packages_distributions().get("cqd", [])] or ["cqd-distill"]
    seen, todo, pins = set(), list(own), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if name not in own:
            pins.append(f"{name}=={dist.version}")
        todo.extend(name_of(r) for r in dist.requires or [] if not re.search(r"\bextra\s*==", r))
    return hashlib.sha256("\n".join([sys.version, *sorted(pins)]).encode()).hexdigest()[:16]


def marker(commit: str) -> str:
    return json.dumps({"commit": commit, "runs": runs_digest(), "env": env_digest(),
                       "run_names": [name for name, _ in RUNS]}, sort_keys=True)


# --- running one side ----------------------------------------------------------------------------------------

def run_side(side_dir: Path, src: Path, marker_text: str | None) -> int:
    side_dir = side_dir.resolve()
    src = src.resolve()
    if not (src / "cqd" / "__init__.py").is_file():
        sys.exit(f"compare_runs.py: {src} holds no cqd package (cqd/__init__.py)")
    tag = side_dir.name.removeprefix("run-")
    (side_dir / LOGS).mkdir(parents=True, exist_ok=True)
    work, cache = side_dir.parent / f"work-{tag}", side_dir.parent / f"cache-{tag}"
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(src), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0")
    status = side_dir / STATUS
    status.write_text("")
    failed = 0
    for name, args in RUNS:
        argv = [a.replace("{run}", str(side_dir / name)).replace("{cache}", str(cache)) for a in args]
        log = side_dir / LOGS / f"{name}.log"
        t0 = time.perf_counter()
        with open(log, "w") as f:
            f.write("$ PYTHONPATH=%s OMP_NUM_THREADS=1 python -m cqd --debug %s\n" % (src, " ".join(map(repr, argv))))
            f.flush()
            try:
                # --debug: a failure's full traceback in the log (it changes nothing else)
                rc = subprocess.run([sys.executable, "-m", "cqd", "--debug", *argv], cwd=work, env=env, stdout=f,
                                    stderr=subprocess.STDOUT).returncode
            except OSError as e:
                f.write(f"compare_runs.py: cannot start python -m cqd: {e}\n")
                rc = 127
        secs = time.perf_counter() - t0
        failed += rc != 0
        with open(status, "a") as f:
            f.write(f"{name}\t{rc}\t{secs:.1f}\n")
        print(f"[{tag}] {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {secs:.0f} s", flush=True)
    if marker_text and not failed:
        (side_dir / MARKER).write_text(marker_text)
    return 1 if failed else 0


def read_status(side_dir: Path) -> dict[str, int]:
    p = side_dir / STATUS
    if not p.is_file():
        return {}
    out = {}
    for line in p.read_text().splitlines():
        name, rc, *_ = line.split("\t")
        out[name] = int(rc)
    return out


# --- comparing -----------------------------------------------------------------------------------------------

def timing(key: str) -> bool:
    last = re.split(r"[./]", key)[-1]
    return bool(TIMING.search(last))


def flatten(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        out = {f"{prefix}.len": len(obj)}  # a list that lost or gained items differs even if its items are skipped
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: obj}


def result_values(path: Path) -> dict[str, object]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        return {"(whole file)": data}
    flat = flatten({k: v for k, v in data.items() if k not in SKIP_TOP})
    return {k: v for k, v in flat.items()
            if not timing(k) and not (isinstance(v, str) and v.startswith("/"))}


def metrics_values(path: Path) -> dict[str, str]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {"rows": str(len(rows))}
    for i, row in enumerate(rows):
        at = f"epoch {row['epoch']}" if row.get("epoch") not in (None, "") else f"row {i + 1}"
        for col, cell in row.items():
            if col is not None and not timing(col):
                out[f"[{at}].{col}"] = cell if cell is not None else ""
    return out


def same(a, b) -> bool:
    """Equal values: the same JSON value, or two numbers (or number texts) of the same float value, NaN = NaN."""
    if type(a) is type(b) and a == b:
        return True
    fa, fb = _num(a), _num(b)
    return fa is not None and fb is not None and (fa == fb or (math.isnan(fa) and math.isnan(fb)))


def _num(v) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip():
        try:
            return float(v)
        except ValueError:
            return None
    return None


def folders(side_dir: Path) -> set[str]:
    found = set()
    for name in (RESULT, METRICS):
        for p in side_dir.rglob(name):
            found.add(str(p.parent.relative_to(side_dir)))
    return found


def compare_folder(old: Path, new: Path) -> tuple[int, list[tuple[str, object, object]]]:
    """(values compared, [(key, old, new)] that differ) of one run folder."""
    n, diffs = 0, []
    for fname, read in ((RESULT, result_values), (METRICS, metrics_values)):
        a, b = old / fname, new / fname
        if not a.is_file() and not b.is_file():
            continue
        if not a.is_file() or not b.is_file():
            diffs.append((fname, "present" if a.is_file() else "MISSING", "present" if b.is_file() else "MISSING"))
            continue
        try:
            va, vb = read(a), read(b)
        except (OSError, ValueError, csv.Error) as e:
            diffs.append((fname, "unreadable", f"{type(e).__name__}: {e}"))
            continue
        for key in sorted(va.keys() | vb.keys()):
            n += 1
            x, y = va.get(key, "(absent)"), vb.get(key, "(absent)")
            if key not in va or key not in vb or not same(x, y):
                diffs.append((f"{fname}:{key}", x, y))
    return n, diffs


def tail(path: Path, lines: int = 25) -> str:
    if not path.is_file():
        return "    (no log)"
    return "\n".join("    | " + line for line in path.read_text(errors="replace").splitlines()[-lines:])


def compare(old_dir: Path, new_dir: Path) -> int:
    st = {"old": read_status(old_dir), "new": read_status(new_dir)}
    dirs = {"old": old_dir, "new": new_dir}
    names = [name for name, _ in RUNS]
    fa, fb = folders(old_dir), folders(new_dir)
    identical = total = values = 0
    failures = []
    print(f"not compared: result.json's {', '.join(sorted(SKIP_TOP))}; timing fields/columns (images_per_s, *_s, "
          "*wall*, *seconds*, *time*); paths")
    for name in names:
        mine = sorted(f for f in fa | fb if f == name or f.startswith(name + "/"))
        rcs = {side: st[side].get(name) for side in ("old", "new")}
        state = ", ".join(f"{side} {'not run' if rc is None else 'ok' if rc == 0 else f'FAILED (exit {rc})'}"
                          for side, rc in rcs.items())
        print(f"\n== {name}: {len(mine)} run folder(s); {state}")
        for side, rc in rcs.items():
            if rc != 0:
                failures.append(f"{name} on {side}")
                print(f"  {side} side's log, last lines ({dirs[side] / LOGS / (name + '.log')}):")
                print(tail(dirs[side] / LOGS / f"{name}.log"))
        if not mine:  # a command that left no run folder on either side counts as one run that is not identical
            total += 1
            print(f"  {'DIFFERS':<9} {name}: no {RESULT} or {METRICS} on either side")
        for f in mine:
            total += 1
            if f not in fa or f not in fb:
                print(f"  {'DIFFERS':<9} {f}: only on the {'new' if f not in fa else 'old'} side")
                continue
            n, diffs = compare_folder(old_dir / f, new_dir / f)
            values += n
            if not diffs:
                identical += 1
                print(f"  {'identical':<9} {f} ({n} values)")
                continue
            print(f"  {'DIFFERS':<9} {f}: {len(diffs)} of {n} values differ")
            for key, x, y in diffs[:SHOW]:
                print(f"      {key}: old {x!r} new {y!r}")
            if len(diffs) > SHOW:
                print(f"      ... and {len(diffs) - SHOW} more: {', '.join(k for k, _, _ in diffs[SHOW:SHOW + 20])}"
                      + (" ..." if len(diffs) > SHOW + 20 else ""))
    extra = sorted(f for f in fa | fb if f.split("/")[0] not in names)
    for f in extra:
        print(f"  (not in the run list, ignored: {f})")
    print()
    if failures:
        print(f"failed commands: {', '.join(failures)}")
    print(f"{identical} of {total} runs identical in every compared value ({values} values compared)")
    return 0 if identical == total and not failures and total else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["runs"]:
        for name, args in RUNS:
            print(name, " ".join(map(repr, args)))
        return 0
    if argv[:1] == ["marker"] and len(argv) == 2:
        print(marker(argv[1]))
        return 0
    if argv[:1] == ["run"] and len(argv) in (3, 5) and (len(argv) == 3 or argv[3] == "--marker"):
        return run_side(Path(argv[1]), Path(argv[2]), argv[4] if len(argv) == 5 else None)
    if argv[:1] == ["compare"] and len(argv) == 3:
        return compare(Path(argv[1]), Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
