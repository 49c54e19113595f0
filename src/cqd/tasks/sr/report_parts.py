"""Pieces the SR table and its SGN section share: mean and spread, row labels, crop panels."""
from __future__ import annotations

import statistics
from pathlib import Path


def stat(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def row_labels(grid) -> list[tuple[str, str]]:
    """(row id, label) in the grid's order; a label given twice gets the row id appended."""
    from cqd.methods import METHODS

    out: list[tuple[str, str]] = []
    for row in grid.rows:
        label = row.label or METHODS.get(row.set.get("method.name", grid.base.method.name)).label or row.id
        out.append((row.id, label if label not in {lab for _, lab in out} else f"{label} [{row.id}]"))
    return out


def fmt(st: dict, digits: int) -> str:
    if st["mean"] is None:
        return "-"
    return f"{st['mean']:.{digits}f}" + (f" ± {st['std']:.{digits}f}" if st["n"] > 1 else "")


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
