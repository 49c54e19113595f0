"""When does CQD help? The report of a regimes study (configs/regimes.yaml): heat maps of per-seed differences.

A regimes study is a grid whose columns are regimes (usually training-set sizes: a column sets data.train_subset)
and whose row ids name a role: `B`, `staged`, `cqd`, `cqd_cal` (CQD from a calibrated teacher), with `_priv` for the
same from a privileged teacher (`teacher.train_subset`) and optionally a degradation in front (`clutter.cqd`). For
each degradation, teacher (own or privileged) and column, each comparison (CQD - staged, CQD - B, calibrated CQD -
CQD, ...) is the difference of top-1 on z seed by seed (seed s of one row minus seed s of the other); a cell shows
their mean and standard deviation, and is marked (`sure`) where every seed has the same sign and |mean| > std.
B has no privileged twin: the privileged comparisons with B use the one B row.

    python -m cqd.analysis.regimes configs/regimes.yaml [key=value ...]   # regimes.md, .json, .png in out_dir
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cqd.errors import CQDError  # noqa: E402
from cqd.experiments.grid import cell_config  # noqa: E402
from cqd.experiments.schema import load_grid_config  # noqa: E402
from cqd.files import load_json, save_json, save_text  # noqa: E402
from cqd.reports.figures import save_figure  # noqa: E402

ROLES = ("B", "staged", "cqd", "cqd_cal")
COMPARISONS = (("cqd", "staged"), ("cqd", "B"), ("cqd_cal", "staged"), ("cqd_cal", "cqd"))
KINDS = ("own", "privileged")
NAMES = {"B": "B", "staged": "staged", "cqd": "CQD", "cqd_cal": "CQD (calibrated f)"}


def parse_row(row_id: str) -> tuple[str, str, str] | None:
    """(degradation prefix or '', role, kind) of a row id, or None for a row outside the study's roles."""
    deg, _, rest = row_id.rpartition(".")
    kind = "privileged" if rest.endswith("_priv") else "own"
    role = rest[:-len("_priv")] if kind == "privileged" else rest
    return (deg, role, kind) if role in ROLES and not (role == "B" and kind == "privileged") else None


def collect(grid) -> dict:
    """Top-1 on z of every study cell, its teacher's top-1 on x and z and its calibration, from the result files:
    {degradation: {(role, kind): {column: [per seed]}}} and the teachers'; a CQDError names missing results."""
    out, acc, teachers, missing = Path(grid.out_dir), {}, {}, []
    for row in grid.rows:
        parsed = parse_row(row.id)
        if parsed is None:
            continue
        prefix, role, kind = parsed
        for column, col in grid.columns.items():
            deg = prefix or col.degradation or grid.base.data.degradation
            for seed in grid.seeds:
                path = Path(cell_config(grid, column, row, seed, out, tuned=False).out_dir) / "result.json"
                if not path.is_file():
                    missing.append(str(path))
                    continue
                r = load_json(path)
                acc.setdefault(deg, {}).setdefault((role, kind), {}).setdefault(column, []).append(r["acc_lq"])
                if r.get("teacher"):
                    t = load_json(Path(r["teacher"]).parent / "result.json")
                    cal = (r.get("teacher_calibration") or [None])[0]
                    entry = teachers.setdefault(deg, {}).setdefault(kind, {}).setdefault(column, {})
                    entry.setdefault(seed, {"acc_hq": t["acc_hq"], "acc_lq": t["acc_lq"]})
                    if cal:
                        entry[seed]["temperature"] = cal["temperature"]
    if missing:
        raise CQDError(f"{len(missing)} cell(s) of the study have no result yet (e.g. {missing[0]}): run "
                       "`cqd table --config <this config>` first")
    return {"acc": acc, "teachers": teachers}


def _stat(diffs: list[float]) -> dict:
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return {"per_seed": diffs, "mean": mean, "std": std, "sure": same_sign and abs(mean) > std}


def heat_maps(grid) -> dict:
    """{degradation: {"a-b": {kind: {column: {per_seed, mean, std, sure}}}}} in points, with the accuracies."""
    data = collect(grid)
    maps = {}
    for deg, rows in data["acc"].items():
        for a, b in COMPARISONS:
            for kind in KINDS:
                ka, kb = (a, kind), (b, "own" if b == "B" else kind)
                if ka not in rows or kb not in rows:
                    continue
                for column in grid.columns:
                    diffs = [100 * (x - y) for x, y in zip(rows[ka][column], rows[kb][column])]
                    maps.setdefault(deg, {}).setdefault(f"{a}-{b}", {}).setdefault(kind, {})[column] = _stat(diffs)
    acc = {deg: {f"{role}{'_priv' if kind == 'privileged' else ''}": cols for (role, kind), cols in rows.items()}
           for deg, rows in data["acc"].items()}
    return {"columns": list(grid.columns), "labels": [c.label or k for k, c in grid.columns.items()],
            "seeds": list(grid.seeds), "differences": maps, "accuracy": acc, "teachers": data["teachers"]}


def _fmt(st: dict) -> str:
    text = f"{st['mean']:+.2f} ± {st['std']:.2f}"
    return f"**{text}**" if st["sure"] else text


def markdown(maps: dict, title: str) -> str:
    cols, labels = maps["columns"], maps["labels"]
    head = "| | " + " | ".join(labels) + " |\n|---|" + "---|" * len(cols) + "\n"
    parts = [f"# {title}\n", "Differences of top-1 on z in points: mean ± std of the per-seed differences over "
             f"seeds {maps['seeds']}; **bold**: the same sign on every seed and |mean| > std.\n"]
    for deg, comps in maps["differences"].items():
        parts.append(f"## {deg}\n")
        for comp, kinds in comps.items():
            a, b = comp.split("-")
            parts.append(f"{NAMES[a]} - {NAMES[b]}:\n\n" + head + "".join(
                f"| {kind} f | " + " | ".join(_fmt(kinds[kind][c]) for c in cols) + " |\n" for kind in kinds))
        parts.append("Top-1 on z per seed (%):\n\n" + head + "".join(
            f"| {row} | " + " | ".join(", ".join(f"{100 * v:.1f}" for v in vals[c]) for c in cols) + " |\n"
            for row, vals in maps["accuracy"][deg].items()))
        for kind, per_col in maps["teachers"].get(deg, {}).items():
            parts.append(f"{kind} f per seed (top-1 on x / on z; T_cal where calibrated): " + "; ".join(
                f"{lab}: " + ", ".join(f"{100 * t['acc_hq']:.1f}/{100 * t['acc_lq']:.1f}"
                                       + (f" T {t['temperature']:.2f}" if "temperature" in t else "")
                                       for _, t in sorted(per_col[c].items()))
                for c, lab in zip(cols, labels) if c in per_col) + "\n")
    return "\n".join(parts)


def figure(maps: dict, path: Path) -> Path:
    """One heat map per degradation and comparison: teachers (rows) x columns, text mean ± std, * where sure."""
    panels = [(deg, comp, kinds) for deg, comps in maps["differences"].items() for comp, kinds in comps.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.6), squeeze=False)
    for ax, (deg, comp, kinds) in zip(axes[0], panels):
        rows = list(kinds)
        means = [[kinds[k][c]["mean"] for c in maps["columns"]] for k in rows]
        top = max(1e-6, max(abs(v) for line in means for v in line))
        ax.imshow(means, cmap="RdBu", vmin=-top, vmax=top, aspect="auto")
        for i, k in enumerate(rows):
            for j, c in enumerate(maps["columns"]):
                st = kinds[k][c]
                ax.text(j, i, f"{st['mean']:+.1f}{'*' if st['sure'] else ''}\n±{st['std']:.1f}", ha="center",
                        va="center", fontsize=8, color="white" if abs(st["mean"]) > 0.6 * top else "black")
        a, b = comp.split("-")
        ax.set_title(f"{deg}\n{NAMES[a]} - {NAMES[b]}", fontsize=8)
        ax.set_xticks(range(len(maps["labels"])), maps["labels"], fontsize=7)
        ax.set_yticks(range(len(rows)), [f"{k} f" for k in rows], fontsize=7)
    return save_figure(fig, path)


def write(grid) -> dict:
    """regimes.json, regimes.md and regimes.png in the grid's out_dir; returns the heat-map data."""
    maps = heat_maps(grid)
    out = Path(grid.out_dir)
    save_json(maps, out / "regimes.json")
    save_text(markdown(maps, grid.name), out / "regimes.md")
    figure(maps, out / "regimes.png")
    return maps


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m cqd.analysis.regimes CONFIG [key=value ...]", file=sys.stderr)
        return 2
    try:
        grid = load_grid_config(argv[0], argv[1:])
        write(grid)
    except CQDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(grid.out_dir) / 'regimes.md'}, regimes.json and regimes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
