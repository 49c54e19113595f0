"""The classification task: top-1 of each evaluated network on each view of the test set.

The loop only asks for "the metrics of this epoch"; logits, labels and top-1 live here, so a task
with other outputs (e.g. images and PSNR) is another module beside this one.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def evaluate(models: dict, views, loader, maker, fabric) -> dict[str, float]:
    """{prefix + 'acc_' + view: top-1}: `views(pair)` gives each view's (inputs, targets) (x: acc_hq,
    z: acc_lq; inputs may be a tuple of a network's arguments, e.g. (z, c) for a mix-conditioned net);
    `models` maps a prefix ('' for the student) to a network. Synced across ranks: each rank counts its
    correct and total predictions, and one all-reduce sums them (an exact integer sum; torchmetrics'
    MulticlassAccuracy did the same, but importing torchmetrics cost every process ~2 s). A maker of low-quality
    test images alone (`lq_only`) gets no top-1 on x."""
    modes = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    counts: dict[str, torch.Tensor] = {}  # key: [correct, total]
    for batch in loader:
        pair = maker(batch, fabric.device)
        for view, (inputs, targets) in views(pair).items():
            if view == "hq" and getattr(maker, "lq_only", False):  # low-quality test images alone: x is z's source
                continue
            for prefix, model in models.items():
                key = f"{prefix}{'/' if prefix else ''}acc_{view}"
                with fabric.autocast():
                    pred = (model(*inputs) if isinstance(inputs, tuple) else model(inputs)).float().argmax(1)
                c = counts.setdefault(key, torch.zeros(2, dtype=torch.long, device=fabric.device))
                c[0] += (pred == targets).sum()
                c[1] += targets.numel()
    for k, m in models.items():
        m.train(modes[k])
    total = fabric.all_reduce(torch.stack(list(counts.values())), reduce_op="sum").tolist()
    return {k: correct / n for k, (correct, n) in zip(counts, total)}
