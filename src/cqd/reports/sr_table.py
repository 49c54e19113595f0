"""The super-resolution table (task `sr`): PSNR-Y and SSIM-Y per method and scale, mean ± std over seeds,
the bicubic baseline first, and a figure of crops (bicubic / student / distilled student / teacher / HR).

Columns are the grid's columns (e.g. x2, x4); rows its rows, labelled by the row's label or its method's.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from cqd.engine.checkpoint import save_text
from cqd.engine.sr import METRICS
from cqd.reports.table import run_rows, write_runs

BICUBIC = "bicubic"


def _stat(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def row_labels(grid) -> list[tuple[str, str]]:
    """(row id, label) in the grid's order; a label given twice gets the row id appended."""
    from cqd.methods import METHODS

    out: list[tuple[str, str]] = []
    for row in grid.rows:
        label = row.label or METHODS.get(row.set.get("method.name", grid.base.method.name)).label or row.id
        out.append((row.id, label if label not in {lab for _, lab in out} else f"{label} [{row.id}]"))
    return out


def summarize(cells, grid) -> dict:
    """{column: {label: {"psnr": stat, "ssim": stat}}}, the bicubic line first (the same for every seed and row)."""
    res = {(c.column, c.row, c.cfg.seed): r for c, r in cells if r is not None and c.row is not None}
    table = {}
    for column in grid.columns:
        first = next((r for (col, _, _), r in res.items() if col == column and r.get("psnr_bicubic") is not None), None)
        rows = {BICUBIC: {k: _stat([first[f"{k}_bicubic"]] if first else []) for k in ("psnr", "ssim")}}
        for row, label in row_labels(grid):
            got = [res[(column, row, s)] for s in grid.seeds if (column, row, s) in res]
            rows[label] = {k: _stat([r[k] for r in got if r.get(k) is not None]) for k in ("psnr", "ssim")}
        table[column] = rows
    return table


def _fmt(st: dict, digits: int) -> str:
    if st["mean"] is None:
        return "-"
    return f"{st['mean']:.{digits}f}" + (f" ± {st['std']:.{digits}f}" if st["n"] > 1 else "")


def markdown(table: dict, grid) -> str:
    cols = list(table)
    n = len(grid.seeds)
    test = ", ".join(grid.base.sr.test)
    out = [f"## {grid.name}", "",
           f"PSNR (dB) / SSIM on the Y channel (BT.601, `scale` px shaved) of the held-out images ({test}), "
           f"mean ± std over {n} seed(s); bicubic is PIL's.", "",
           "| Method | " + " | ".join(f"{c} PSNR | {c} SSIM" for c in cols) + " |",
           "|---|" + "---|---|" * len(cols)]
    for label in table[cols[0]]:
        out.append(f"| {label} | " + " | ".join(f"{_fmt(table[c][label]['psnr'], 2)} | {_fmt(table[c][label]['ssim'], 4)}"
                                                for c in cols) + " |")
    return "\n".join(out) + "\n"


def write_report(cells, grid, out: Path) -> tuple[str, dict]:
    """table.md (with the grid's `reference` text under it), table.json, runs.csv, runs.json and crops.png."""
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(cells, grid)
    md = markdown(table, grid)
    runs = run_rows(cells, lambda cfg: {"scale": cfg.sr.scale}, METRICS)
    missing = sum(res is None for _, res in cells)
    note = f"\n{missing} of {len(cells)} runs are not finished yet.\n" if missing else ""
    ref = "" if grid.reference is None else "\n" + grid.reference.rstrip("\n") + "\n"
    from cqd.reports import sgn_table

    if sgn_table.has_sgn(cells):  # students conditioned on the loss mix c: PSNR/SSIM at each c (sgn.json), sgn.png
        md += sgn_table.section(cells, grid, out)
    save_text(md + note + ref, out / "table.md")
    write_runs(runs, grid, table, out)
    if not missing:
        crops_figure(cells, grid, out / "crops.png")
    return md + note + ref, table


def _pick(cells, column: str, seed: int, methods: tuple[str, ...]):
    for name in methods:
        for c, res in cells:
            if c.column == column and c.cfg.seed == seed and c.cfg.method.name == name and res is not None and c.kind == "train":
                return c
    return None


def crops_figure(cells, grid, path: Path, size: int = 96) -> list[tuple[str, list[str]]]:
    """One row per column (scale): a `size` px HR crop of the first test image as bicubic, the student alone
    (sr_l1), the distilled student (lsfd, else fitnet, else output KD), the teacher and the HR image.
    Returns each row's column and panel titles."""
    import torch

    from cqd.engine import sr
    from cqd.engine.model_files import MODEL, load_model

    seed = grid.seeds[0]
    panels = []
    for column in grid.columns:
        alone, distilled = _pick(cells, column, seed, ("sr_l1",)), _pick(cells, column, seed, ("lsfd", "sr_fitnet", "sr_okd"))
        ref = alone or distilled
        if ref is None:
            continue
        cfg = ref.cfg
        test = sr.build_datasets(cfg)[1]
        maker = sr.PatchMaker(cfg, test)
        lr, hr, bic = maker.whole(0, "cpu")
        h, w = hr.shape[-2:]
        top, left = max(0, h // 2 - size // 2), max(0, w // 2 - size // 2)
        crop = lambda t: t[0, :, top:top + size, left:left + size].clamp(0, 1).permute(1, 2, 0).numpy()  # noqa: E731
        row = [(f"bicubic\n{float(sr.sr_metrics(bic, hr, cfg.sr.scale)[0][0]):.2f} dB", crop(bic))]
        teacher = next((c.cfg.teacher.checkpoint for c, _ in cells if c.column == column and c.cfg.teacher.checkpoint), None)
        models = [("student alone", alone and Path(alone.cfg.out_dir) / MODEL),
                  (f"distilled ({distilled.cfg.method.name})" if distilled else "distilled", distilled and Path(distilled.cfg.out_dir) / MODEL),
                  ("teacher", teacher and Path(teacher))]
        for label, p in models:
            if p is None or not Path(p).is_file():
                continue
            model, _ = load_model(p)
            with torch.no_grad():
                out = sr.quantize(model.eval()(lr))
            psnr, _ = sr.sr_metrics(out, hr, cfg.sr.scale)
            row.append((f"{label}\n{float(psnr[0]):.2f} dB", crop(out)))
        row.append((f"HR ({test.names[0]})", crop(hr)))
        panels.append((column, row))
    if not panels:
        return []
    save_panels([[(f"{column}, {t}" if j == 0 else t, img) for j, (t, img) in enumerate(row)] for column, row in panels], path)
    return [(column, [title for title, _ in row]) for column, row in panels]


def save_panels(rows: list[list[tuple[str, object]]], path: Path, width: float = 2.2, fontsize: int = 8) -> None:
    """A PNG of titled image panels, one figure row per list of (title, HxWx3 array); short rows left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(width * ncol, 2.4 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(ncol):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                ax.imshow(row[j][1], interpolation="nearest")
                ax.set_title(row[j][0], fontsize=fontsize)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
