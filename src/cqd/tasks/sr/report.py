"""The super-resolution table (task `sr`): PSNR-Y and SSIM-Y per method and scale, mean ± std over seeds,
the bicubic baseline first, and a figure of crops (bicubic / student / distilled student / teacher / HR).

Columns are the grid's columns (e.g. x2, x4); rows its rows, labelled by the row's label or its method's.
"""
from __future__ import annotations

from pathlib import Path

from cqd.files import save_text
from cqd.tasks.classification.report import run_rows, write_runs
from cqd.tasks.sr.pipeline import METRICS
from cqd.tasks.sr.report_parts import fmt, row_labels, save_panels, stat

BICUBIC = "bicubic"
RESIZE = {"matlab": "MATLAB's (imresize)", "pil": "PIL's"}  # sr.resize


def summarize(cells, grid) -> dict:
    """{column: {label: {"psnr": stat, "ssim": stat}}}, the bicubic line first (the same for every seed and row)."""
    res = {(c.column, c.row, c.cfg.seed): r for c, r in cells if r is not None and c.row is not None}
    table = {}
    for column in grid.columns:
        first = next((r for (col, _, _), r in res.items() if col == column and r.get("psnr_bicubic") is not None), None)
        rows = {BICUBIC: {k: stat([first[f"{k}_bicubic"]] if first else []) for k in ("psnr", "ssim")}}
        for row, label in row_labels(grid):
            got = [res[(column, row, s)] for s in grid.seeds if (column, row, s) in res]
            rows[label] = {k: stat([r[k] for r in got if r.get(k) is not None]) for k in ("psnr", "ssim")}
        table[column] = rows
    return table


def markdown(table: dict, grid) -> str:
    cols = list(table)
    n = len(grid.seeds)
    test = ", ".join(grid.base.sr.test)
    out = [f"## {grid.name}", "",
           f"PSNR (dB) / SSIM on the Y channel (BT.601, `scale` px shaved) of the held-out images ({test}), "
           f"mean ± std over {n} seed(s); LR images and the bicubic line are made with "
           f"{RESIZE[grid.base.sr.resize]} bicubic.", "",
           "| Method | " + " | ".join(f"{c} PSNR | {c} SSIM" for c in cols) + " |",
           "|---|" + "---|---|" * len(cols)]
    for label in table[cols[0]]:
        out.append(f"| {label} | " + " | ".join(f"{fmt(table[c][label]['psnr'], 2)} | {fmt(table[c][label]['ssim'], 4)}"
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
    from cqd.tasks.sr import sgn_report as sgn_table

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
            if (c.column == column and c.cfg.seed == seed and c.cfg.method.name == name and res is not None
                    and c.kind == "train"):
                return c
    return None


def crops_figure(cells, grid, path: Path, size: int = 96) -> list[tuple[str, list[str]]]:
    """One row per column (scale): a `size` px HR crop of the first test image as bicubic, the student alone
    (sr_l1), the distilled student (lsfd, else fitnet, else output KD), the teacher and the HR image.
    Returns each row's column and panel titles."""
    import torch

    from cqd.engine.model_files import MODEL, load_model
    from cqd.tasks.sr import pipeline as sr

    seed = grid.seeds[0]
    panels = []
    for column in grid.columns:
        alone, distilled = (_pick(cells, column, seed, ("sr_l1",)),
                            _pick(cells, column, seed, ("lsfd", "sr_fitnet", "sr_okd")))
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
        teacher = next((c.cfg.teacher.checkpoint for c, _ in cells if c.column == column and c.cfg.teacher.checkpoint),
                       None)
        models = [("student alone", alone and Path(alone.cfg.out_dir) / MODEL),
                  (f"distilled ({distilled.cfg.method.name})" if distilled else "distilled",
                   distilled and Path(distilled.cfg.out_dir) / MODEL),
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
    save_panels([[(f"{column}, {t}" if j == 0 else t, img) for j, (t, img) in enumerate(row)]
                 for column, row in panels], path)
    return [(column, [title for title, _ in row]) for column, row in panels]
