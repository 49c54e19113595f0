"""Figures: the degradation grid (paper Figure 3) and the robustness curves (`cqd robustness`)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from cqd.data.paired import PairMaker  # noqa: E402
from cqd.degradations.sweep import PARAMS  # noqa: E402


def show_image(ax, img: torch.Tensor) -> None:
    img = img.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def degradation_grid(dataset, specs: list[str], out: str | Path, n: int = 8, hq_view: str = "full",
                     lq_views: dict[str, str] | None = None, seed: int = 0) -> Path:
    """A row of high-quality images, then one row per degradation (boxes drawn where T reports one)."""
    lq_views = lq_views or {}
    idx = list(range(min(n, len(dataset))))
    batch = {k: torch.stack([torch.as_tensor(dataset[i][k]) for i in idx])
             for k in ("full", "crop", "box", "label", "index")}
    rows = []
    for spec in specs:
        maker = PairMaker(spec, hq_view=hq_view, lq_view=lq_views.get(spec, "full"), seed=seed)
        maker.prepare(dataset)
        x, z, box = maker.views(batch, "cpu")
        rows.append((spec, z, box))
    rows.insert(0, ("high quality (x)", x, None))
    fig, axes = plt.subplots(len(rows), len(idx), figsize=(1.3 * len(idx) + 1.5, 1.4 * len(rows)), squeeze=False)
    for r, (title, imgs, boxes) in enumerate(rows):
        for c in range(len(idx)):
            ax = axes[r][c]
            show_image(ax, imgs[c])
            h, w = imgs.shape[-2:]
            if boxes is not None and boxes[c].tolist() != [0, 0, w, h]:
                x0, y0, x1, y1 = boxes[c].tolist()
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="red", lw=1))
        axes[r][0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("Degradations T: high-quality x (top) and z = T(x) (one row each)", fontsize=9)
    return save_figure(fig, out)


def robustness_figure(rows: list[dict], families: list[dict], out: str | Path) -> dict[str, list[str]]:
    """One panel per degradation family (the clean set left out): top-1 against severity, mildest first, one
    line per model (its label). Returns each panel's line labels, read from the drawn axes."""
    swept = [f for f in families if f["name"] != "clean"]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    top = {(r["label"], r["spec"]): 100 * r["top1"] for r in rows}
    clean = {r["label"]: 100 * r["top1"] for r in rows if r["family"] == "clean"}
    cols = min(3, len(swept))
    nrows = -(-len(swept) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    drawn = {}
    for ax, f in zip(axes.flat, swept):
        ticks = list(range(len(f["severities"])))
        for lab in labels:
            ax.plot(ticks, [top[(lab, spec)] for _, spec in f["severities"]], marker="o", label=lab)
        ax.set_xticks(ticks, [str(s) for s, _ in f["severities"]], fontsize=8)
        ax.set_title(f"{f['name']} ({PARAMS[f['name']]})" if f["name"] in PARAMS else f["name"], fontsize=9)
        ax.set_xlabel("severity (mild -> severe)", fontsize=8)
        ax.set_ylabel("top-1 (%)", fontsize=8)
        ax.grid(alpha=0.3)
        drawn[f["name"]] = [line.get_label() for line in ax.get_lines()]
    for ax in list(axes.flat)[len(swept):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, title="clean: " + ", ".join(f"{lab} {v:.1f}" for lab, v in clean.items()),
                        title_fontsize=7)
    save_figure(fig, out)
    return drawn


def save_figure(fig, out: str | Path) -> Path:
    """Lay `fig` out, write it as `out` (its folder made) at 110 dpi, and close it."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
