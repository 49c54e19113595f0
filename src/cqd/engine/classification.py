"""The classification task: top-1 of each evaluated network on each view of the test set.

The loop only asks for "the metrics of this epoch"; logits, labels and top-1 live here, so a task
with other outputs (e.g. images and PSNR) is another module beside this one.
"""
from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassAccuracy


@torch.no_grad()
def evaluate(models: dict, views, loader, maker, fabric, num_classes: int) -> dict[str, float]:
    """{prefix + 'acc_' + view: top-1}: `views(pair)` gives each view's (inputs, targets) (x: acc_hq,
    z: acc_lq); `models` maps a prefix ('' for the student) to a network. Synced across ranks."""
    modes = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    acc = {}
    for batch in loader:
        pair = maker(batch, fabric.device)
        for view, (inputs, targets) in views(pair).items():
            for prefix, model in models.items():
                key = f"{prefix}{'/' if prefix else ''}acc_{view}"
                if key not in acc:
                    acc[key] = MulticlassAccuracy(num_classes, average="micro").to(fabric.device)
                with fabric.autocast():
                    acc[key].update(model(inputs).float().argmax(1), targets)
    for k, m in models.items():
        m.train(modes[k])
    return {k: float(m.compute()) for k, m in acc.items()}
