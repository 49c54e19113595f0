"""What every dataset returns, so the paired-batch builder can treat them alike.

An item is a dict:
    full  uint8 (C, S, S)  the whole image resized to S x S
    crop  uint8 (C, S, S)  the object's box cropped from the original, resized to S x S
                           (the whole image again when the dataset has no boxes)
    box   float32 (4,)     the object's box in `full`'s pixel coordinates, xyxy
    label int64 ()         class index in [0, num_classes)
    index int64 ()         position of the item in this dataset (seeds its degradation)
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


class ImageDataset(Dataset):
    num_classes: int
    classes: list[str]
    in_chans: int = 3
    image_size: int
    has_boxes: bool = False

    def clutter_bank(self, n: int, seed: int = 0) -> Tensor:
        """uint8 (n, C, S, S) of `full` images, drawn without replacement by `seed` (clutter's source)."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[: min(n, len(self))]
        return torch.stack([self[int(i)]["full"] for i in idx])


class InMemoryImages(ImageDataset):
    """A whole split held as one uint8 tensor (N, C, S, S) with its labels; `__getitems__` serves a batch with
    one slice (no per-item collation). Subclasses set `classes`, `num_classes`, `mean` and `std`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images.contiguous(), labels.long()
        self.in_chans, self.image_size = images.shape[1], images.shape[-1]
        self.box = torch.tensor([0.0, 0.0, self.image_size, self.image_size])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"full": self.images[i], "crop": self.images[i], "box": self.box.clone(),
                "label": self.labels[i], "index": torch.tensor(i)}

    def __getitems__(self, indices: list[int]) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]
        return {"full": x, "crop": x, "box": self.box.expand(len(idx), 4), "label": self.labels[idx], "index": idx}

    @staticmethod
    def collate(batch: dict) -> dict:
        return batch

    def clutter_bank(self, n: int, seed: int = 0) -> torch.Tensor:
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return self.images[idx]
