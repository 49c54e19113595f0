"""Datasets by name. A builder takes (root, split, image_size, on_corrupt) and returns an ImageDataset."""
from __future__ import annotations

from cqd.data.base import ImageDataset
from cqd.registry import Registry

DATASETS: Registry = Registry("dataset")

# registry entries
from cqd.data import cars, cub, fashion_mnist, folder  # noqa: E402,F401

__all__ = ["DATASETS", "ImageDataset"]
