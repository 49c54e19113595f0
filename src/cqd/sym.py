"""The sym-parameter c of SGN (Chang, Park, Yang, Kwak, ICCV 2019): a point on the simplex, one per sample.

Task-independent parts, used by quality-conditioned CQD (`methods/symcqd.py`, `data/blend.py`) and by any
method that mixes K behaviours:

  dirichlet(draws, alpha, k)   c ~ Dirichlet(alpha) per sample, from the project's counter-based draws
  draw_c(seed, index, epoch)   the same keyed by (seed, sample index, epoch): reproducible in any batch or order
  mix_losses(c, losses, names) sum_k c_k L_k per sample, averaged over the batch (SGN's loss mixing)

The gates that feed c into a network are `cqd.models.sym`.

Dirichlet draws are K independent Gamma(alpha_k) variates normalized to sum 1. Gamma(a) comes from
Marsaglia and Tsang's squeeze method (2000) on Gamma(a + 1) boosted by U^(1/a) (their trick for a < 1,
used for every a so one code path serves all), computed in log space and normalized with a softmax, so a
small alpha (draws near the corners) never underflows to 0/0. The method accepts a candidate with
probability above 0.95; each variate gets `CANDIDATES` candidates and takes the first accepted one, so a
whole batch draws at once with a fixed number of random numbers per sample (all candidates rejected has
probability below 1e-20; the variate is then the Gamma(a + 1) mode-like value d, still deterministic).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from cqd.degradations.base import Draws
from cqd.errors import CQDError

CANDIDATES = 16
C_STREAM = 0x5C  # the draws' stream for c, apart from the degradations' (stream 0 and their substreams)
_HALF_ULP = 0.5 / (1 << 24)  # Draws.uniform gives k / 2^24, k in [0, 2^24): shifted to (0, 1), log never -inf


def _alphas(alpha: float | Sequence[float], k: int, device) -> Tensor:
    a = torch.as_tensor(alpha, dtype=torch.float32, device=device).flatten()
    if a.numel() == 1:
        a = a.expand(k)
    if a.numel() != k:
        raise CQDError(f"Dirichlet alpha has {a.numel()} values but c has K={k} components; give one value or K")
    if not bool((a > 0).all()) or not bool(torch.isfinite(a).all()):
        raise CQDError(f"Dirichlet alpha must be finite and > 0, got {a.tolist()}")
    return a


def log_gamma_draws(draws: Draws, alpha: Tensor) -> Tensor:
    """(B, K) log of independent Gamma(alpha_k, 1) variates, one row per sample of `draws`."""
    k, r = alpha.numel(), CANDIDATES
    d = (alpha + 1.0) - 1.0 / 3.0  # Marsaglia-Tsang on Gamma(alpha + 1)
    cc = 1.0 / torch.sqrt(9.0 * d)
    x = draws.normal(k * r).view(-1, k, r)
    u = (draws.uniform(k * r) + _HALF_ULP).view(-1, k, r)
    boost = draws.uniform(k) + _HALF_ULP
    v = (1.0 + cc[:, None] * x) ** 3
    ok = v > 0
    logv = torch.log(torch.where(ok, v, torch.ones_like(v)))
    accept = ok & (torch.log(u) < 0.5 * x * x + d[:, None] - d[:, None] * v + d[:, None] * logv)
    first = accept.float().argmax(-1, keepdim=True)  # the first accepted candidate (0 when none is)
    chosen = torch.gather(logv, -1, first).squeeze(-1)
    chosen = torch.where(accept.any(-1), chosen, torch.zeros_like(chosen))  # none accepted: v = 1, i.e. d
    return torch.log(d) + chosen + torch.log(boost) / alpha  # Gamma(a) = Gamma(a + 1) * U^(1/a)


def dirichlet(draws: Draws, alpha: float | Sequence[float], k: int) -> Tensor:
    """(B, k) float32 points on the simplex, c ~ Dirichlet(alpha), row b from sample b's draws only."""
    if k < 1:
        raise CQDError(f"c needs at least one component, got K={k}")
    a = _alphas(alpha, k, draws.key.device)
    return torch.softmax(log_gamma_draws(draws, a), dim=1)


def draw_c(seed: int, index: Tensor, epoch: int | None, alpha: float | Sequence[float], k: int,
           stream: int = C_STREAM) -> Tensor:
    """c for each sample of a batch, keyed by (seed, sample index, epoch): the same sample gets the same c in
    any batch, order, process or resumed run; another epoch (or `epoch=None`, a fixed draw) another c."""
    return dirichlet(Draws(seed, index, epoch, stream), alpha, k)


def check_simplex(c: Tensor, k: int | None = None, what: str = "c") -> Tensor:
    """`c` itself when it is a (B, K) batch of points on the simplex (>= 0, rows summing to 1), else a CQDError."""
    if c.dim() != 2 or (k is not None and c.shape[1] != k):
        want = f"(B, {k})" if k is not None else "(B, K)"
        raise CQDError(f"{what} must be a {want} batch of simplex points, got shape {tuple(c.shape)}")
    cf = c.detach().float()
    if bool((cf < 0).any()) or not torch.allclose(cf.sum(1), torch.ones_like(cf[:, 0]), atol=1e-4):
        raise CQDError(f"{what} must lie on the simplex (every c_k >= 0, sum_k c_k = 1); got rows summing to "
                       f"{cf.sum(1)[:4].tolist()}... with minimum {float(cf.min()):.3g}")
    return c


def corners_midpoints_centre(k: int) -> dict[str, list[float]]:
    """The fixed test mixes of K components: each corner e_k, each mid-point (e_i + e_j) / 2 and the centre."""
    eye = [[float(i == j) for j in range(k)] for i in range(k)]
    out = {f"corner{i}": eye[i] for i in range(k)}
    for i in range(k):
        for j in range(i + 1, k):
            out[f"mid{i}{j}"] = [(a + b) / 2 for a, b in zip(eye[i], eye[j])]
    out["centre"] = [1.0 / k] * k
    return out


def mix_losses(c: Tensor, losses: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """SGN's loss mixing: mean over the batch of sum_k c[b, k] * losses[names[k]][b].

    Each named loss is per sample, shape (B,) (or a scalar, the same for every sample); `names` gives the
    order of c's components. With c one-hot on k this is exactly the batch mean of loss k.
    """
    if c.dim() != 2 or c.shape[1] != len(names):
        raise CQDError(f"mix_losses: c has shape {tuple(c.shape)} but {len(names)} loss names were given "
                       f"({', '.join(names)}): c must be (B, {len(names)})")
    missing = [n for n in names if n not in losses]
    if missing:
        raise CQDError(f"mix_losses: no loss named {', '.join(map(repr, missing))}; the losses are "
                       f"{', '.join(map(repr, losses))}")
    b = c.shape[0]
    cols = []
    for n in names:
        term = losses[n]
        if term.dim() == 0:
            term = term.expand(b)
        if term.shape != (b,):
            raise CQDError(f"mix_losses: loss {n!r} has shape {tuple(term.shape)}; give it per sample, shape ({b},)")
        cols.append(term)
    per = torch.stack(cols, 1)
    return (c.to(per.dtype) * per).sum(1).mean()


def dirichlet_moments(alpha: Sequence[float]) -> tuple[list[float], list[float]]:
    """(mean, variance) of each component of Dirichlet(alpha): a_k / a0 and a_k (a0 - a_k) / (a0^2 (a0 + 1))."""
    a0 = math.fsum(alpha)
    return [a / a0 for a in alpha], [a * (a0 - a) / (a0 * a0 * (a0 + 1)) for a in alpha]
