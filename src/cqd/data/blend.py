"""Blended pairs for quality mixes: z_c = sum_k c_k T_k(x), with c on the K-simplex travelling in the Pair.

`data.mix: {degradations: [T_1, ..., T_K], alpha: 0.5}` makes every run's pairs blends (any method then
trains and tests on them: A+B, CQD, the quality-conditioned student). The K twins T_k(x) are made as a
plain run's twins are (the same seed, so the corner c = e_k gives exactly the twin a run with
`data.degradation: T_k` sees), made once and kept on the device with fixed pairs; each step gathers the
batch's K twins in one lookup and blends them with c in one batched product (no per-twin copies).

c per sample: Dirichlet(alpha) keyed by (data.seed, sample index, epoch) (`cqd.sym.draw_c`): a new mix
every epoch, the same in any batch order, process count or resumed run; every method of a table sees the
same mixes. `c: [...]` fixes one mix for every sample (a test set at that c); `BlendMaker(c_table=...)`
gives item i the mix c_table[i mod R] (a test set of R mixes).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from cqd.data.paired import Pair, PairMaker
from cqd.degradations import Degradation, parse_degradation
from cqd.errors import CQDError
from cqd.sym import check_simplex, draw_c


@dataclasses.dataclass
class Blend(Degradation):
    """The K degradations of a blend (its spec names them); the blending itself needs c, so BlendMaker does it."""

    name: ClassVar[str] = "blend"
    stages: list = dataclasses.field(default_factory=list)

    def check(self, channels: int, size: int) -> None:
        for s in self.stages:
            s.check(channels, size)

    def forward(self, x, draws):
        raise CQDError("a blend of degradations needs the mix c of each sample: pairs are made by BlendMaker")

    def spec(self) -> str:
        return "blend(" + "|".join(s.spec() for s in self.stages) + ")"


def check_mixable(specs: list[str]) -> list[Degradation]:
    """The K degradations of a mix, parsed; one that moves the object (clutter) cannot be blended pixel-wise."""
    if len(specs) < 2:
        raise CQDError(f"a mix needs at least 2 degradations, got {len(specs)} ({specs}); "
                       "for one, use data.degradation")
    Ts = [parse_degradation(s) for s in specs]
    canonical = [T.spec() for T in Ts]
    twice = [spec for i, spec in enumerate(specs) if canonical[i] in canonical[:i]]
    if twice:
        raise CQDError(f"degradation {twice[0]!r} is listed twice in the mix ({specs}): each of the K degradations "
                       "is one component of c, and two equal ones make c ambiguous; list each once")
    for spec, T in zip(specs, Ts):
        if T.needs_bank:
            raise CQDError(f"degradation {spec!r} moves the object into other images (its twins differ in geometry), "
                           "so it cannot be blended pixel by pixel with others; leave it out of data.mix")
    return Ts


class BlendMaker(PairMaker):
    """A PairMaker whose z is the blend sum_k c_k T_k(lq view) and whose Pair carries c.

    c: Dirichlet(`alpha`) per (seed, index, epoch), or `c_table` (R, K): item i gets row i mod R.
    """

    def __init__(self, degradations: list[str], alpha: float = 0.5, c_table: Tensor | None = None, **kwargs):
        Ts = check_mixable(list(degradations))
        super().__init__("none", **kwargs)
        self.specs, self.k, self.alpha = list(degradations), len(Ts), alpha
        self.T = Blend(stages=Ts)
        self.makers = [PairMaker(T, **kwargs) for T in Ts]  # T_k's twins exactly as a plain run of T_k makes them
        self.c_table = None if c_table is None else check_simplex(torch.as_tensor(c_table, dtype=torch.float32), self.k,
                                                                 "data.mix.c")
        self._table: tuple[Tensor, Tensor, Tensor] | None = None  # (slot of each dataset index, (N, K, C, H, W), boxes)

    def prepare(self, dataset) -> None:
        self.T_hq.check(dataset.in_chans, dataset.image_size)
        for m in self.makers:
            m.prepare(dataset)

    @torch.no_grad()
    def fix_twins(self, loader, device, size: int) -> int:
        """Make the K twins of every item once (the plain makers' twins) and keep them on `device`, (N, K, C, H, W)."""
        if self.fresh:
            raise CQDError("fix_twins needs fixed pairs; with fresh_each_epoch the twins change every epoch")
        self._table = None
        slot, zs, boxes, n = torch.full((size,), -1, dtype=torch.long), [], [], 0
        for batch in loader:
            views = [m.views(batch, device) for m in self.makers]
            slot[batch["index"]] = torch.arange(n, n + len(views[0][1]))
            zs.append(torch.stack([z for _, z, _ in views], 1))
            boxes.append(views[0][2])
            n += len(views[0][1])
        if n:
            self._table = (slot, torch.cat(zs), torch.cat(boxes))
        return n

    def mix_of(self, index: Tensor, epoch: int) -> Tensor:
        """(B, K) c of each sample: its row of c_table, or its Dirichlet draw for this epoch."""
        if self.c_table is not None:
            return self.c_table.to(index.device)[index.long() % len(self.c_table)]
        return draw_c(self.seed, index, epoch, self.alpha, self.k)

    def twins(self, batch: dict, device, epoch: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """x, the K twins (B, K, C, H, W) and the box, unnormalized."""
        x = self.hq(batch, device, epoch)
        if self._table is not None:
            slot = self._table[0][batch["index"].cpu()]
            if bool((slot >= 0).all()):
                slot = slot.to(device, non_blocking=True)
                return x, self._table[1][slot], self._table[2][slot]
        views = [m.views(batch, device, epoch) for m in self.makers]
        return x, torch.stack([z for _, z, _ in views], 1), views[0][2]

    def blend_views(self, batch: dict, device, epoch: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Unnormalized x, z_c = sum_k c_k T_k(x), box and c."""
        x, zs, box = self.twins(batch, device, epoch)
        c = self.mix_of(batch["index"].to(device), epoch)
        z = torch.bmm(c.to(zs.dtype)[:, None, :], zs.flatten(2)).view_as(zs[:, 0])
        return x, z, box, c

    def views(self, batch: dict, device, epoch: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        x, z, box, _ = self.blend_views(batch, device, epoch)
        return x, z, box

    def __call__(self, batch: dict, device, epoch: int = 0) -> Pair:
        x, z, box, c = self.blend_views(batch, device, epoch)
        return Pair(self.normalize(x), self.normalize(z), batch["label"].to(device), box, batch["index"].to(device), c)
