"""Temperature scaling of a teacher's logits and the expected calibration error.

Follows Guo et al. 2017 ("On calibration of modern neural networks") and the authors' code
(gpleiss/temperature_scaling): one temperature T for all classes, fitted by minimizing the NLL of
softmax(logits / T) on held-out items, and the ECE over 15 equal-width confidence bins (lower edge
excluded, upper included). The fit runs LBFGS on log T (so T stays positive) in float64, from T = 1.
Cross-quality distillation with a calibrated teacher: Cuk et al. 2023.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature)."""
    return float(F.cross_entropy(logits.double() / temperature, labels))


def ece(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Expected calibration error: sum over confidence bins (lo, hi] of |bin| / n * |accuracy - mean confidence|."""
    conf, pred = logits.double().softmax(1).max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.double().mean() * (correct[inside].mean() - conf[inside].mean()).abs()
    return float(total)


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The T > 0 that minimizes the NLL of softmax(logits / T) on these items."""
    logits, labels = logits.detach().double().cpu(), labels.cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def calibration(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """The fitted temperature, and the NLL and ECE before and after dividing the logits by it."""
    t = fit_temperature(logits, labels)
    return {"temperature": t, "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, t),
            "ece_before": ece(logits, labels), "ece_after": ece(logits.double() / t, labels)}
