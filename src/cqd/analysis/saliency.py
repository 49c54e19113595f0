"""Input-gradient saliency and tau (paper section 5, Figure 4): does a model look inside the object's box?

G_i = ||d log p(y | z) / d z_i||_2 over the channels of pixel i, and
tau = sum_{i in box} G_i / sum_i G_i, the share of the gradient inside the box (1 for a perfect
detector). Boxes are xyxy in pixels, pixel (row r, column c) being the square [c, c+1] x [r, r+1];
a box with fractional edges counts each pixel by the share of its area it covers (coverage weights),
so a uniform G gives tau = the box's share of the image's area exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from cqd.analysis.multires import derive, trained, trained_f_and_g  # noqa: E402
from cqd.engine.loaders import eval_loader  # noqa: E402
from cqd.engine.model_files import load_model  # noqa: E402
from cqd.engine.precision import make_fabric  # noqa: E402
from cqd.engine.schema import RunConfig  # noqa: E402
from cqd.errors import CQDError  # noqa: E402
from cqd.files import atomic_write, save_json  # noqa: E402
from cqd.reports.figures import show_image  # noqa: E402
from cqd.tasks.classification.data import build_datasets, make_maker


def input_gradient(model: nn.Module, images: Tensor, labels: Tensor,
                   normalize: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """G: (B, H, W) per-pixel L2 norm over channels of d log p(y | image) / d image.

    The model is put in eval mode and float32, autocast is off, and the log-softmax runs in float64
    so that a confident model's 1 - p(y) is not rounded to 0. With `normalize` the gradient is taken
    w.r.t. the image before normalization.
    """
    model.eval().float()
    img = images.detach().float().clone().requires_grad_(True)
    with torch.enable_grad(), torch.autocast(img.device.type, enabled=False):
        logits = model(normalize(img) if normalize else img)
        log_lik = F.log_softmax(logits.double(), dim=1).gather(1, labels.view(-1, 1).to(logits.device)).sum()
        (grad,) = torch.autograd.grad(log_lik, img)
    return grad.norm(dim=1)


def box_weights(box: Tensor, h: int, w: int) -> Tensor:
    """(B, H, W) share of each pixel's area inside its image's box (B, 4) xyxy, in [0, 1]."""
    box = box.double()

    def cover(lo: Tensor, hi: Tensor, n: int) -> Tensor:
        edge = torch.arange(n, dtype=torch.float64, device=box.device)
        return (torch.minimum(hi[:, None], edge + 1) - torch.maximum(lo[:, None], edge)).clamp(0, 1)

    return cover(box[:, 1], box[:, 3], h)[:, :, None] * cover(box[:, 0], box[:, 2], w)[:, None, :]


def tau(G: Tensor, box: Tensor) -> Tensor:
    """(B,) share of the gradient inside the box, in [0, 1]; NaN for an image whose gradient is all 0."""
    G = G.double()
    inside = (G * box_weights(box, *G.shape[-2:])).sum((1, 2))
    total = G.sum((1, 2))
    return torch.where(total > 0, inside / total, torch.full_like(total, float("nan")))


def _draw_box(ax, box: Tensor) -> None:
    x0, y0, x1, y1 = box.tolist()
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="red", lw=1))


def saliency_figure(images: Tensor, boxes: Tensor, maps: dict[str, Tensor], taus: dict[str, Tensor], out: Path) -> Path:
    """Figure 4 left: images z with the object's box, then one row of gradient maps per model (darker = larger G)."""
    n = images.shape[0]
    fig, axes = plt.subplots(1 + len(maps), n, figsize=(1.3 * n + 1.5, 1.45 * (1 + len(maps))), squeeze=False)
    for c in range(n):
        show_image(axes[0][c], images[c])
        _draw_box(axes[0][c], boxes[c])
        for r, (name, G) in enumerate(maps.items(), 1):
            ax = axes[r][c]
            g = G[c].double()
            ax.imshow((g / g.quantile(0.99).clamp_min(1e-30)).clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1)
            _draw_box(ax, boxes[c])
            ax.set_title(f"tau={float(taus[name][c]):.2f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("image z", rotation=0, ha="right", va="center", fontsize=8)
    for r, name in enumerate(maps, 1):
        axes[r][0].set_ylabel(f"gradient of {name}", rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("||d log p(y|z) / dz||: darker is larger; red: the object's box", fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return out


def tau_scatter(tau_b: Tensor, tau_cqd: Tensor, out: Path) -> Path:
    """Figure 4 right: tau_B (x) against tau_CQD (y), the diagonal, and both means."""
    keep = tau_b.isfinite() & tau_cqd.isfinite()
    mb, mc = float(tau_b[keep].mean()), float(tau_cqd[keep].mean())
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    ax.scatter(tau_b.numpy(), tau_cqd.numpy(), s=6, alpha=0.5, lw=0)
    ax.plot([0, 1], [0, 1], color="gray", lw=1, label="tau_CQD = tau_B")
    ax.axvline(mb, color="tab:orange", ls="--", lw=1, label=f"mean tau_B = {mb:.3f}")
    ax.axhline(mc, color="tab:green", ls="--", lw=1, label=f"mean tau_CQD = {mc:.3f}")
    ax.plot([mb], [mc], marker="*", ms=12, color="tab:red", ls="none", label="(mean tau_B, mean tau_CQD)")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="tau of B (trained on z)", ylabel="tau of CQD",
           title=f"share of the gradient inside the box, {len(tau_b)} images")
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return out


def _json_floats(t: Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in t.tolist()]


def _gradients_and_taus(models: dict[str, nn.Module], loader, maker, n: int, show: int, device) -> tuple:
    """Over the first `n` test images: each model's tau per image (lists of per-batch tensors), the images'
    dataset indices, labels and boxes, and the first batch's `show` images, boxes and gradient maps."""
    taus = {k: [] for k in models}
    index, labels, boxes, shown = [], [], [], None
    for batch in loader:
        _, z, box = maker.views(batch, device)
        y = batch["label"].to(device)
        take = min(len(y), n - len(index))
        z, box, y = z[:take], box[:take], y[:take]
        maps = {k: input_gradient(m, z, y, maker.normalize) for k, m in models.items()}
        for k, G in maps.items():
            taus[k].append(tau(G, box).cpu())
        if shown is None:
            shown = (z[:show].cpu(), box[:show].cpu(), {k: G[:show].cpu() for k, G in maps.items()})
        index += batch["index"][:take].tolist()
        labels += y.tolist()
        boxes += box.cpu().tolist()
        if len(index) >= n:
            break
    return taus, index, labels, boxes, shown


def explain(cfg: RunConfig, n: int = 1000, show: int = 8, log: Callable[[str], None] = print) -> dict:
    """Train (or reuse) B (method lq) and CQD under `cfg.out_dir`, compute tau on the first `n` test images,
    write saliency.png, tau_scatter.png and tau.json there; returns the JSON's content."""
    if n < 1:
        raise CQDError(f"--n must be at least 1 image, got {n}")
    _, test_ds, _, base_test = build_datasets(cfg)
    if n > len(test_ds):
        log(f"the test set has {len(test_ds)} images (data.test_subset): using all of them, not {n}")
        n = len(test_ds)
    maker = make_maker(cfg, base_test)
    loader = eval_loader(cfg, test_ds, base_test)
    probe = maker.views(next(iter(loader)), "cpu")
    h, w = probe[1].shape[-2:]
    if bool((probe[2] == torch.tensor([0.0, 0.0, w, h])).all()):
        raise CQDError(f"data.degradation={cfg.data.degradation!r} leaves the object's box the whole image, so tau "
                       f"is 1 for every model; use a localization task, e.g. data.degradation=clutter")

    out = Path(cfg.out_dir)
    paths = {"B": trained(derive(cfg, "lq", "lq"), log), "CQD": trained_f_and_g(cfg, log)[1]}
    device = make_fabric(cfg.train, devices=1).device
    models = {k: load_model(p, base_test.num_classes, base_test.in_chans)[0].to(device) for k, p in paths.items()}

    taus, index, labels, boxes, shown = _gradients_and_taus(models, loader, maker, n, show, device)
    tb, tc = (torch.cat(taus[k]) for k in ("B", "CQD"))

    saliency_figure(*shown, {k: t[:show] for k, t in (("B", tb), ("CQD", tc))}, out / "saliency.png")
    tau_scatter(tb, tc, out / "tau_scatter.png")
    finite = tb.isfinite() & tc.isfinite()
    result = {"n": n, "degradation": cfg.data.degradation,
              "box_rule": "coverage weights: each pixel counts by the share of its area inside the box",
              "mean_tau_B": float(tb[finite].mean()), "mean_tau_CQD": float(tc[finite].mean()),
              "share_tau_CQD_above_B": float((tc[finite] > tb[finite]).double().mean()),
              "n_zero_gradient": int((~finite).sum()), "models": {k: str(p) for k, p in paths.items()},
              "tau_B": _json_floats(tb), "tau_CQD": _json_floats(tc),
              "index": index, "label": labels, "box": boxes, "config": cfg.model_dump()}
    save_json(result, out / "tau.json")
    return result
