"""The SGN part of the SR table (`cqd table` on a grid with `sgn` rows, e.g. configs/sgn_table.yaml).

PSNR-Y / SSIM-Y against the loss mix c = (L1, adversarial, distillation): each `sgn` student trained on drawn c
at the simplex's 3 corners, 3 mid-points and centre (the metrics its run logged as `corner0/psnr`, ...), beside
the single-loss students (`sgn` rows with a one-hot `fixed_c`) at their corner; mean ± std over the seeds. The
figure `sgn.png` shows the same crop of the first held-out image at each c, the single-loss students, bicubic,
the teacher and HR; `sgn.json` holds the numbers.
"""
from __future__ import annotations

from pathlib import Path

from cqd.sym import corners_midpoints_centre
from cqd.tasks.sr.report_parts import fmt, row_labels, save_panels, stat

FIGURE = "sgn.png"
NAMES = ("L1", "adv", "KD")  # c's components, in the order of cqd.methods.sgn.LOSSES


def points() -> dict[str, list[float]]:
    return corners_midpoints_centre(len(NAMES))


def point_label(name: str, c: list[float]) -> str:
    parts = [NAMES[k] for k, w in enumerate(c) if w > 0]
    what = "centre" if name == "centre" else " + ".join(parts) + (" alone" if len(parts) == 1 else "")
    return f"{what} ({', '.join(f'{w:.2g}' for w in c)})"


def _rows(cells, grid) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """([(row id, label)] of sgn students trained on drawn c, {corner point name: row id} of single-loss students)."""
    labels = dict(row_labels(grid))
    mixed, corners = [], {}
    seen = set()
    for c, _ in cells:
        if c.row is None or c.row in seen or c.cfg.method.name != "sgn":
            continue
        seen.add(c.row)
        fixed = c.cfg.method.sgn.fixed_c
        if fixed is None:
            mixed.append((c.row, labels[c.row]))
        elif sorted(fixed) == [0.0] * (len(NAMES) - 1) + [1.0]:
            corners.setdefault(f"corner{fixed.index(1.0)}", c.row)
    return mixed, corners


def has_sgn(cells) -> bool:
    return any(c.cfg.method.name == "sgn" for c, _ in cells if c.row is not None)


def summarize(cells, grid) -> dict:
    """{column: {point: {row id: {"psnr": stat, "ssim": stat}}}}: each sgn student at every point, each
    single-loss student at its corner."""
    mixed, corners = _rows(cells, grid)
    res = {(c.column, c.row, c.cfg.seed): r for c, r in cells if r is not None and c.row is not None}
    out = {}
    for column in grid.columns:
        table = {}
        for name in points():
            table[name] = {}
            for row, _ in mixed:
                got = [(res[(column, row, s)].get("history") or [{}])[-1] for s in grid.seeds
                       if (column, row, s) in res]
                table[name][row] = {k: stat([h[f"{name}/{k}"] for h in got if h.get(f"{name}/{k}") is not None])
                                    for k in ("psnr", "ssim")}
            if name in corners:
                row = corners[name]
                got = [res[(column, row, s)] for s in grid.seeds if (column, row, s) in res]
                table[name][row] = {k: stat([r[k] for r in got if r.get(k) is not None]) for k in ("psnr", "ssim")}
        out[column] = table
    return out


def markdown(table: dict, cells, grid) -> str:
    mixed, corners = _rows(cells, grid)
    heads = [label for _, label in mixed] + ["single-loss student (its corner)"] * bool(corners)
    out = ["", ("In the table above an SGN student stands at its `eval_c` (default: the centre), a single-loss student "
                "at its corner.")]
    for column, by_point in table.items():
        out += ["", f"### {grid.columns[column].label or column}: PSNR / SSIM against the loss mix "
                    "c = (L1, adv, KD)", "",
                "| c | " + " | ".join(f"{h} PSNR | SSIM" for h in heads) + " |",
                "|---|" + "---:|---:|" * len(heads)]
        for name, c in points().items():
            cols = [by_point[name].get(row) for row, _ in mixed]
            if corners:
                cols.append(by_point[name].get(corners.get(name)))
            out.append(f"| {point_label(name, c)} | " + " | ".join(
                "- | -" if st is None else f"{fmt(st['psnr'], 2)} | {fmt(st['ssim'], 4)}" for st in cols) + " |")
    return "\n".join(out) + "\n"


def section(cells, grid, out: Path) -> str:
    """The markdown to append to table.md; writes the summary (sgn.json) and, once every run is done, the figure."""
    from cqd.files import save_json

    table = summarize(cells, grid)
    md = markdown(table, cells, grid)
    save_json(table, out / "sgn.json")
    if all(r is not None for _, r in cells):
        panels = figure(cells, grid, out / FIGURE)
        if panels:
            md += f"\nFigure: `{FIGURE}` (seed {grid.seeds[0]}; whole-image PSNR in each title).\n"
    return md


def _crop_at(hr, size: int) -> tuple[int, int]:
    """The top-left corner of the `size` px window with the most detail (largest mean |gradient| of HR), on a coarse
    grid."""
    g = hr[0].mean(0)
    energy = (g[1:, :-1] - g[:-1, :-1]).abs() + (g[:-1, 1:] - g[:-1, :-1]).abs()
    h, w = energy.shape
    stride = max(size // 2, 1)
    best = max(((float(energy[t:t + size, l:l + size].mean()), t, l) for t in range(0, max(h - size, 0) + 1, stride)
                for l in range(0, max(w - size, 0) + 1, stride)), default=(0.0, 0, 0))  # noqa: E741
    return best[1], best[2]


def _crop(img, top: int, left: int, size: int):
    """HxWx3 numpy crop of a (1, 3, H, W) image in [0, 1]."""
    return img[0, :, top:top + size, left:left + size].clamp(0, 1).permute(1, 2, 0).numpy()


def figure(cells, grid, path: Path, size: int = 96) -> list[tuple[str, list[str]]]:
    """Per grid column, two rows of crops of the first test image: the first sgn student (first seed) at each
    point of c; then the single-loss students, bicubic, the teacher and HR. Returns each row's panel titles."""
    import torch

    from cqd.engine.model_files import MODEL, load_model
    from cqd.models.sym import AtMix
    from cqd.tasks.sr import pipeline as sr

    mixed, corners = _rows(cells, grid)
    seed = grid.seeds[0]
    by = {(c.column, c.row): c for c, r in cells if r is not None and c.cfg.seed == seed and c.row is not None}
    rows = []
    for column in grid.columns:
        ref = by.get((column, mixed[0][0])) if mixed else None
        if ref is None:
            continue
        cfg = ref.cfg
        test = sr.build_datasets(cfg)[1]
        lr, hr, bic = sr.PatchMaker(cfg, test).whole(0, "cpu")
        at = (*_crop_at(hr, size), size)

        def panel(title: str, out, hr=hr, scale=cfg.sr.scale, at=at):
            return f"{title}\n{float(sr.sr_metrics(out, hr, scale)[0][0]):.2f} dB", _crop(sr.quantize(out), *at)

        student, _ = load_model(Path(ref.cfg.out_dir) / MODEL)
        student.eval()
        top_row = []
        with torch.no_grad():
            for name, c in points().items():
                top_row.append(panel(f"sgn, c = {point_label(name, c).split(' (')[0]}", AtMix(student, c)(lr)))
            bottom = []
            for name in points():
                if name in corners and (column, corners[name]) in by:
                    model, _ = load_model(Path(by[(column, corners[name])].cfg.out_dir) / MODEL)
                    bottom.append(panel(f"{NAMES[int(name[-1])]} alone (own net)", AtMix(model, points()[name])(lr)))
            bottom.append(panel("bicubic", bic))
            teacher = ref.cfg.teacher.checkpoint
            if teacher and Path(teacher).is_file():
                model, _ = load_model(teacher)
                bottom.append(panel("teacher", model.eval()(lr)))
        bottom.append((f"HR ({test.names[0]})", _crop(hr, *at)))
        rows += [(column, top_row), (column, bottom)]
    if not rows:
        return []
    save_panels([row for _, row in rows], path, width=2.1, fontsize=7)
    return [(column, [title for title, _ in row]) for column, row in rows]
