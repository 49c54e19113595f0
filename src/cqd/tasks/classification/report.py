"""Table 1 in the paper's layout from a grid's results: markdown, CSV, JSON and a bar chart."""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cqd.errors import CQDError  # noqa: E402
from cqd.files import save_json, save_text  # noqa: E402

PAPER_TABLE1 = """\
Paper's Table 1 (Su and Maji, vgg-m on CUB-200-2011 / Stanford Cars; other data, for reference only):

| Method | Local. CUB | Res. CUB | Res. CARS | Edge CUB | Edge CARS | Dist. CUB | Local.+Res. CUB |
|---|---|---|---|---|---|---|---|
| A -> A upper bound | 67.0 | 67.0 | 59.3 | 67.0 | 59.3 | 67.0 | 67.0 |
| A -> B no adaptation | 57.4 | 39.4 | 7.6 | 1.9 | 4.2 | 49.7 | 24.9 |
| B -> B fine-tuning | 60.8 | 61.0 | 41.6 | 29.2 | 45.5 | 58.4 | 46.2 |
| A+B -> B data augment. | 63.6 | 62.2 | 47.3 | 32.5 | 51.3 | 61.7 | 51.7 |
| A,B -> B staged training | 62.4 | 62.3 | 48.4 | 30.4 | 50.1 | 60.9 | 50.4 |
| CQD -> B | 64.4 | 64.4 | 48.8 | 34.1 | 51.5 | 63.0 | 52.7 |
"""


def _stat(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def lines(grid) -> list[tuple[str, str, str]]:
    """(row id, line label, metric) for every line of the table, in the grid's row order. A row gives its
    method's lines (the teacher row hq: A -> A on x and A -> B on z; others one line on z), under the
    row's own label when it has one; a label another row already has gets the row's id appended."""
    from cqd.methods import METHODS

    out = []
    for row in grid.rows:
        cls = METHODS.get(row.set.get("method.name", grid.base.method.name))
        own = cls.table_lines or ((cls.label or row.id, "acc_lq"),)
        if row.label:
            own = [(row.label, k) for _, k in own] if len(own) == 1 else [(f"{row.label}: {lab}", k) for lab, k in own]
        if row.tuned:
            own = [(f"{lab} (tuned)", k) for lab, k in own]
        taken = {label for _, label, _ in out}
        out += [(row.id, label if label not in taken else f"{label} [{row.id}]", key) for label, key in own]
    return out


def summarize(cells, grid) -> dict:
    """{column: {line label: stat}} in percent, plus the per-seed 'gap closed' = (CQD - B) / (A->A - B)
    when the grid has the rows hq, lq and cqd."""
    acc = {(c.column, c.row, c.cfg.seed): res for c, res in cells if res is not None and c.row is not None}
    table = {}
    for column in grid.columns:
        rows = {}
        for row, label, key in lines(grid):
            rows[label] = _stat([100 * acc[(column, row, s)][key] for s in grid.seeds
                                 if acc.get((column, row, s), {}).get(key) is not None])  # None: lq-only test set
        gaps = []
        for s in grid.seeds:
            try:
                up, b, c = (100 * acc[(column, r, s)][k]
                            for r, k in (("hq", "acc_hq"), ("lq", "acc_lq"), ("cqd", "acc_lq")))
            except (KeyError, TypeError):  # a row missing, or no top-1 on x (a test set of low-quality images)
                continue
            if up - b > 1e-9:
                gaps.append((c - b) / (up - b))
        rows[GAP] = _stat(gaps)
        table[column] = rows
    return table


GAP = "gap closed (CQD - B) / (A->A - B)"


def _fmt(st: dict, pct: bool = True) -> str:
    if st["mean"] is None:
        return "-"
    if not pct:
        return f"{st['mean']:.2f}" + (f" ± {st['std']:.2f}" if st["n"] > 1 else "")
    return f"{st['mean']:.1f}" + (f" ± {st['std']:.1f}" if st["n"] > 1 else "")


def markdown(table: dict, title: str, n_seeds: int, labels: list[str]) -> str:
    cols = list(table)
    out = [f"## {title}", "",
           f"Top-1 accuracy (%) on the test set, mean ± std over {n_seeds} seed(s). "
           "Train -> test: A = high quality, B = low quality.", "",
           "| Method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label in labels:
        out.append(f"| {label} | " + " | ".join(_fmt(table[c][label]) for c in cols) + " |")
    if any(table[c][GAP]["n"] for c in cols):
        out.append(f"| {GAP} | " + " | ".join(_fmt(table[c][GAP], pct=False) for c in cols) + " |")
    return "\n".join(out) + "\n"


def tuned_settings(grid) -> str:
    """A markdown table of the values each tuned row uses in each column (from its best.yaml), or ''."""
    from cqd.experiments.grid import tuned_values

    rows = [r for r in grid.rows if r.tuned]
    if not rows:
        return ""
    out = ["", "Tuned settings (chosen on the validation split; from each row's best.yaml):", "",
           "| Row | " + " | ".join(grid.columns) + " |", "|---|" + "---|" * len(grid.columns)]
    for row in rows:
        cells = []
        for column in grid.columns:
            try:
                values = tuned_values(row, column)
            except CQDError:
                values = None
            cells.append("not tuned yet" if values is None else
                         ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float)
                                   else f"{k.rsplit('.', 1)[-1]}={v}"
                                   for k, v in values.items()))
        out.append(f"| {row.id} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def run_rows(cells, describe=lambda cfg: {"degradation": cfg.data.degradation},
             metrics=("acc_hq", "acc_lq")) -> list[dict]:
    """One row per finished run: its name, kind, row, method, seed, `describe(cfg)`, `metrics`, speed and config.
    The config, and a described key that the result records itself, are taken from the result: a shared
    teacher's run records the view it was measured on, which is the column of whichever process trained it
    first (`cqd tune` trains a grid's teachers in the column it tunes), not always the cell's first column."""
    rows = []
    for cell, res in cells:
        if res is None:
            continue
        cfg = cell.cfg
        rows.append({"name": cfg.name, "kind": cell.kind, "row": cell.row, "method": cfg.method.name, "seed": cfg.seed,
                     **{k: res.get(k, v) for k, v in describe(cfg).items()}, **{k: res.get(k) for k in metrics},
                     "wall_s": res.get("wall_s"), "images_per_s": res.get("images_per_s"),
                     "precision": res.get("precision"),
                     "config": json.dumps(res.get("config") or cfg.model_dump(), sort_keys=True)})
    return rows


def write_runs(runs: list[dict], grid, table: dict, out: Path) -> None:
    """table.json (the summary and the runs without their configs), runs.json and runs.csv."""
    save_json({"title": grid.name, "seeds": grid.seeds, "table": table,
               "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs]}, out / "table.json")
    save_json(runs, out / "runs.json")
    buf = io.StringIO()
    if runs:
        w = csv.DictWriter(buf, fieldnames=list(runs[0]))
        w.writeheader()
        w.writerows(runs)
    save_text(buf.getvalue(), out / "runs.csv")


def bar_chart(table: dict, path: Path, labels: list[str]) -> None:
    cols = list(table)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(cols), 3.6))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        means = [table[c][label]["mean"] or 0 for c in cols]
        stds = [table[c][label]["std"] or 0 for c in cols]
        ax.bar([j + (i - len(labels) / 2 + 0.5) * width for j in range(len(cols))], means, width, yerr=stds,
               label=label, capsize=2)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    ax.set_title("Cross quality distillation: train -> test")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(cells, grid, out: Path) -> tuple[str, dict]:
    """Writes table.md (under the table: the grid's `reference` text, or else the paper's numbers), table.json,
    runs.csv, runs.json, table.png. The returned markdown ends with the `reference` text when the grid has one."""
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(cells, grid)
    labels = [label for _, label, _ in lines(grid)]
    md = markdown(table, grid.name, len(grid.seeds), labels) + tuned_settings(grid)
    runs = run_rows(cells)
    missing = sum(res is None for _, res in cells)
    note = f"\n{missing} of {len(cells)} runs are not finished yet.\n" if missing else ""
    ref = "" if grid.reference is None else "\n" + grid.reference.rstrip("\n") + "\n"
    save_text(md + note + (ref or "\n" + PAPER_TABLE1), out / "table.md")
    write_runs(runs, grid, table, out)
    bar_chart(table, out / "table.png", labels)
    return md + note + ref, table
