"""Datasets by name. A builder takes (root, split, image_size, on_corrupt) and returns an ImageDataset."""
from __future__ import annotations

from cqd.data.base import ImageDataset
from cqd.registry import Registry, import_modules

DATASETS: Registry = Registry("dataset")

import_modules(__name__, __path__, skip=("base", "images", "paired"))  # each dataset module registers itself

__all__ = ["DATASETS", "ImageDataset"]
