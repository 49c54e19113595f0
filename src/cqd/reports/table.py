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

from cqd.engine.checkpoint import save_json, save_text  # noqa: E402

# (label, description, method row, which test accuracy)
ROWS = [
    ("A -> A", "Upper bound", "hq", "acc_hq"),
    ("A -> B", "No adaptation", "hq", "acc_lq"),
    ("B -> B", "Fine-tuning", "lq", "acc_lq"),
    ("A+B -> B", "Data augment.", "augment", "acc_lq"),
    ("A,B -> B", "Staged training", "staged", "acc_lq"),
    ("CQD -> B", "CQD (proposed)", "cqd", "acc_lq"),
]

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
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarize(cells, columns: list[str], seeds: list[int]) -> dict:
    """{column: {row label: stat}} in percent, plus the per-seed 'gap closed' = (CQD - B) / (A->A - B)."""
    acc = {}
    for kind, cfg, res in cells:
        if res is None or kind != "eval" and cfg.method.name == "hq":
            continue
        column = cfg.name.split("/")[0]
        acc[(column, cfg.method.name, cfg.seed)] = res
    table = {}
    for column in columns:
        rows = {}
        for label, _, method, key in ROWS:
            vals = [100 * acc[(column, method, s)][key] for s in seeds if (column, method, s) in acc]
            rows[label] = _stat(vals)
        gaps = []
        for s in seeds:
            try:
                up, b, c = (100 * acc[(column, m, s)][k] for m, k in (("hq", "acc_hq"), ("lq", "acc_lq"), ("cqd", "acc_lq")))
            except KeyError:
                continue
            if up - b > 1e-9:
                gaps.append((c - b) / (up - b))
        rows["gap closed"] = _stat(gaps)
        table[column] = rows
    return table


def _fmt(st: dict, pct: bool = True) -> str:
    if st["mean"] is None:
        return "-"
    if not pct:
        return f"{st['mean']:.2f}" + (f" ± {st['std']:.2f}" if st["n"] > 1 else "")
    return f"{st['mean']:.1f}" + (f" ± {st['std']:.1f}" if st["n"] > 1 else "")


def markdown(table: dict, title: str, n_seeds: int) -> str:
    cols = list(table)
    lines = [f"## {title}", "",
             f"Top-1 accuracy (%) on the test set, mean ± std over {n_seeds} seed(s). "
             "Train -> test: A = high quality, B = low quality.", "",
             "| Method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, desc, _, _ in ROWS:
        lines.append(f"| {label} {desc.lower()} | " + " | ".join(_fmt(table[c][label]) for c in cols) + " |")
    lines.append("| gap closed (CQD - B) / (A->A - B) | " + " | ".join(_fmt(table[c]["gap closed"], pct=False) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def run_rows(cells) -> list[dict]:
    rows = []
    for kind, cfg, res in cells:
        if res is None:
            continue
        rows.append({"name": cfg.name, "kind": kind, "method": cfg.method.name, "seed": cfg.seed,
                     "degradation": cfg.data.degradation, "acc_hq": res.get("acc_hq"), "acc_lq": res.get("acc_lq"),
                     "wall_s": res.get("wall_s"), "images_per_s": res.get("images_per_s"),
                     "precision": res.get("precision"), "config": json.dumps(cfg.model_dump(), sort_keys=True)})
    return rows


def bar_chart(table: dict, path: Path) -> None:
    cols = list(table)
    labels = [r[0] for r in ROWS]
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


def write_report(cells, columns: list[str], seeds: list[int], out: Path, title: str) -> tuple[str, dict]:
    """Writes table.md (with the paper's numbers for reference), table.json, runs.csv, runs.json, table.png."""
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(cells, columns, seeds)
    md = markdown(table, title, len(seeds))
    runs = run_rows(cells)
    missing = sum(res is None for _, _, res in cells)
    note = f"\n{missing} of {len(cells)} runs are not finished yet.\n" if missing else ""
    save_text(md + note + "\n" + PAPER_TABLE1, out / "table.md")
    save_json({"title": title, "seeds": seeds, "table": table, "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs]},
              out / "table.json")
    save_json(runs, out / "runs.json")
    buf = io.StringIO()
    if runs:
        w = csv.DictWriter(buf, fieldnames=list(runs[0]))
        w.writeheader()
        w.writerows(runs)
    save_text(buf.getvalue(), out / "runs.csv")
    bar_chart(table, out / "table.png")
    return md + note, table
