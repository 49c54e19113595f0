"""Paired batches (x, z, y, box, index): x the high-quality view, z = T(low-quality view).

The pair is made on the training device, batched: the dataset only decodes images. For the
paper's localization task x is the box crop and z the full image (views `crop` and `full`, T =
`none`); for the others both views are the same image and T degrades it. A dataset of real pairs
(`paired_folder`) gives each item its low-quality twin as `lq`: z = T(lq) then, whatever the views.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cqd.degradations import Degradation, parse_degradation
from cqd.errors import CQDError

VIEWS = ("full", "crop")


@dataclass
class Pair:
    x: Tensor  # (B, C, S, S) normalized high-quality view, input of the teacher f
    z: Tensor  # (B, C, S, S) normalized low-quality view, input of the student g
    y: Tensor  # (B,) labels
    box: Tensor  # (B, 4) the object's box in z, xyxy pixels
    index: Tensor  # (B,) dataset indices
    c: Tensor | None = None  # (B, K) the mix of K degradations z was blended from (data.mix), else None

    def __len__(self) -> int:
        return self.y.shape[0]


class PairMaker:
    """Turns a decoded batch into a Pair on `device`: x = T_hq(hq view), z = T(lq view), normalized.

    `fresh_each_epoch=False` keeps the paper's fixed pairs (the twin depends on (seed, index) only).
    """

    def __init__(self, degradation: str | Degradation, hq_view: str = "full", lq_view: str = "full",
                 hq_degradation: str | Degradation = "none", seed: int = 0, fresh_each_epoch: bool = False,
                 mean=(0.5,), std=(0.25,), channels_last: bool = False):
        for key, v in (("hq_view", hq_view), ("lq_view", lq_view)):
            if v not in VIEWS:
                raise CQDError(f"data.{key}={v!r} is not a view; use one of {VIEWS}")
        self.T = parse_degradation(degradation) if isinstance(degradation, str) else degradation
        self.T_hq = parse_degradation(hq_degradation) if isinstance(hq_degradation, str) else hq_degradation
        self.hq_view, self.lq_view, self.seed, self.fresh = hq_view, lq_view, seed, fresh_each_epoch
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._twins: tuple[Tensor, Tensor, Tensor] | None = None  # (row of each dataset index (CPU), z, box)
        self.lq_only = False  # the items are low-quality images alone (x is z's source too): no top-1 on x

    @property
    def teacher_input_fixed(self) -> bool:
        """True when x does not change between epochs, so f(x) can be computed once and cached."""
        return not (self.fresh and self.T_hq.spec() != "none")

    def view_key(self) -> str:
        """What determines x (for the teacher cache's key)."""
        return f"{self.hq_view}|{self.T_hq.spec()}"

    def prepare(self, dataset) -> None:
        """Check T against the dataset's images and give clutter its bank of other images."""
        bank = None
        for T in (self.T, self.T_hq):
            T.check(dataset.in_chans, dataset.image_size)
            if T.needs_bank:
                bank = dataset.clutter_bank(2048, seed=self.seed) if bank is None else bank
                T.bind(bank)

    def normalize(self, img: Tensor) -> Tensor:
        if self.mean.device != img.device:  # moved once: a copy per step would wait for the device
            self.mean, self.std = self.mean.to(img.device), self.std.to(img.device)
        return ((img - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    @torch.no_grad()
    def fix_twins(self, loader, device, size: int) -> int:
        """Make z and its box once for every item `loader` yields and keep them on `device`.

        The paper generated its degraded sets once; with fixed pairs (not `fresh_each_epoch`) a
        twin never changes, so the steps then only look it up. The loader's order fixes the
        batches T sees, so a run and its resumed or multi-process twin get the same table.
        `size` is the dataset's length (batch indices are < size). Returns the number of items.
        """
        if self.fresh:
            raise CQDError("fix_twins needs fixed pairs; with fresh_each_epoch the twins change every epoch")
        self._twins = None
        slot, zs, boxes, n = torch.full((size,), -1, dtype=torch.long), [], [], 0
        for batch in loader:
            _, z, box = self.views(batch, device)
            slot[batch["index"]] = torch.arange(n, n + len(z))
            zs.append(z)
            boxes.append(box)
            n += len(z)
        if n:
            self._twins = (slot, torch.cat(zs), torch.cat(boxes))
        return n

    def hq(self, batch: dict, device, epoch: int = 0) -> Tensor:
        """Unnormalized x = T_hq(high-quality view) in [0, 1]: all a teacher with its own view needs."""
        x = batch[self.hq_view].to(device, non_blocking=True).float().div_(255)
        return self.T_hq(x, batch["index"].to(device, non_blocking=True), self.seed, epoch if self.fresh else None)[0]

    def views(self, batch: dict, device, epoch: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Unnormalized x, z in [0, 1] and z's box."""
        idx = batch["index"].to(device, non_blocking=True)
        ep = epoch if self.fresh else None
        x = self.hq(batch, device, epoch)
        if self._twins is not None:
            slot = self._twins[0][batch["index"].cpu()]  # on the CPU: no device sync to check it
            if bool((slot >= 0).all()):
                slot = slot.to(device, non_blocking=True)
                return x, self._twins[1][slot], self._twins[2][slot]
        source = "lq" if "lq" in batch else self.lq_view  # a real low-quality twin, else a view of the image
        lq = x if source == self.hq_view and self.T_hq.spec() == "none" else (
            batch[source].to(device, non_blocking=True).float().div_(255))
        z, box = self.T(lq, idx, self.seed + 1, ep)
        if box is None:
            box = batch["box"].to(device, non_blocking=True).float() if self.lq_view == "full" else _whole(z)
        return x, z, box

    def __call__(self, batch: dict, device, epoch: int = 0) -> Pair:
        x, z, box = self.views(batch, device, epoch)
        y, index = batch["label"].to(device, non_blocking=True), batch["index"].to(device, non_blocking=True)
        return Pair(self.normalize(x), self.normalize(z), y, box, index)


def _whole(img: Tensor) -> Tensor:
    h, w = img.shape[-2:]
    return torch.tensor([0.0, 0.0, w, h], device=img.device).expand(img.shape[0], 4)


class PairedDataset(torch.utils.data.Dataset):
    """Per-item access for notebooks: item i -> (x, z, y, box, index), unbatched, unnormalized [0, 1]."""

    def __init__(self, dataset, maker: PairMaker):
        self.dataset, self.maker = dataset, maker
        maker.prepare(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        batch = {k: torch.as_tensor(v)[None] for k, v in item.items()}
        x, z, box = self.maker.views(batch, "cpu")
        return x[0], z[0], item["label"], box[0], item["index"]
