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
