"""Shared pieces of the file-based datasets: reading an image safely and turning a record into an item.

A dataset module only has to parse its annotation files into `Record`s; `FileImageDataset` does the
rest (decoding, box checks, `full`/`crop`/`box` of base.py, and what to do with unreadable files).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from cqd.data.base import ImageDataset
from cqd.errors import DataError

SPLITS = ("train", "test")
ON_CORRUPT = ("error", "skip")
BOX_TOLERANCE = 1.0
_MODES = {1: "L", 3: "RGB"}
_SHOWN = 5
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

Box = tuple[float, float, float, float]


class Record(NamedTuple):
    """One image: its file, 0-based label, and object box in original pixels (xyxy) or None."""

    path: Path
    label: int
    box: Box | None = None


def check_split(split: str, dataset: str) -> None:
    """Every file-based dataset has exactly the official train and test splits."""
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r} for dataset {dataset!r}; use one of: {', '.join(SPLITS)}")


def existing_root(root: str | Path | None, what: str, layout: str) -> Path:
    """`root` as a Path, or a DataError showing the expected layout when it is unset or not a folder."""
    if root is None:
        raise DataError(f"The {what} dataset needs a root folder (data.root). Expected {layout}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{what} root {path} does not exist. Expected {layout}")
    return path


def load_image(path: str | Path, in_chans: int = 3) -> Image.Image:
    """Fully decode `path` as an `in_chans`-channel PIL image; a missing, empty, truncated or
    non-image file is a DataError naming it (truncated files are never padded silently)."""
    mode = _MODES.get(in_chans)
    if mode is None:
        raise DataError(f"in_chans={in_chans} is not supported; use 1 (grayscale) or 3 (RGB)")
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except FileNotFoundError:
        raise DataError(f"Image {path} does not exist; the annotation files list it.") from None
    except _DECODE_ERRORS as e:
        raise DataError(
            f"Cannot read image {path}: {e}. Replace the file, or build the dataset with "
            "on_corrupt='skip' to leave unreadable images out."
        ) from None


def _readable_size(path: Path) -> tuple[int, int] | None:
    """(width, height) when the whole file decodes, else None. JPEGs decode at 1/8 scale, which
    still reads every byte of the stream, so truncation is caught at a fraction of the cost."""
    try:
        with Image.open(path) as im:
            size = im.size
            im.draft(None, (1, 1))
            im.load()
        return size
    except _DECODE_ERRORS:
        return None


def _box_error(record: Record, why: str) -> DataError:
    box = ", ".join(f"{v:g}" for v in record.box)
    return DataError(f"Bounding box [{box}] (x1, y1, x2, y2 in pixels) of image {record.path} {why}")


def _check_box_area(record: Record) -> None:
    x1, y1, x2, y2 = record.box
    if not all(math.isfinite(v) for v in record.box):
        raise _box_error(record, "has a non-finite coordinate")
    if x2 <= x1 or y2 <= y1:
        raise _box_error(
            record, f"has zero or negative size ({x2 - x1:g} x {y2 - y1:g}); a box needs x2 > x1 and y2 > y1"
        )


def _fit_box(record: Record, width: int, height: int) -> Box:
    """The box clipped to the image; more than BOX_TOLERANCE pixels outside it is a DataError."""
    x1, y1, x2, y2 = record.box
    t = BOX_TOLERANCE
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        raise _box_error(
            record, f"lies outside the {width}x{height} image; it must fit in [0, {width}] x [0, {height}]"
        )
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    if x2 <= x1 or y2 <= y1:
        raise _box_error(record, f"has no area inside the {width}x{height} image")
    return x1, y1, x2, y2


class FileImageDataset(ImageDataset):
    """Image files with optional boxes, served as the item dicts of base.py.

    on_corrupt="error" raises a DataError naming an unreadable file when it is accessed;
    on_corrupt="skip" decodes every file up front and leaves out the unreadable ones
    (listed in `skipped`, announced by one warning).
    """

    def __init__(
        self,
        records: Sequence[Record],
        classes: Sequence[str],
        image_size: int,
        *,
        on_corrupt: str = "error",
        in_chans: int = 3,
        name: str = "dataset",
    ):
        if on_corrupt not in ON_CORRUPT:
            raise DataError(f"on_corrupt={on_corrupt!r} is not allowed; use one of: {', '.join(ON_CORRUPT)}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise DataError(f"image_size={image_size!r} must be a positive number of pixels, e.g. 224")
        if in_chans not in _MODES:
            raise DataError(f"in_chans={in_chans} is not supported; use 1 (grayscale) or 3 (RGB)")
        self.name = name
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.image_size = image_size
        self.in_chans = in_chans
        self.on_corrupt = on_corrupt
        records = [
            Record(Path(r.path), int(r.label), None if r.box is None else tuple(float(v) for v in r.box))
            for r in records
        ]
        for r in records:
            if r.box is not None:
                _check_box_area(r)
        self.skipped: list[str] = []
        if on_corrupt == "skip":
            records = self._drop_unreadable(records)
        if not records:
            raise DataError(f"{name}: no images to load")
        self.records = records
        self.has_boxes = all(r.box is not None for r in records)

    def _drop_unreadable(self, records: list[Record]) -> list[Record]:
        kept = []
        for r in records:
            size = _readable_size(r.path)
            if size is None:
                self.skipped.append(str(r.path))
                continue
            if r.box is not None:
                _fit_box(r, *size)
            kept.append(r)
        if self.skipped:
            shown = ", ".join(self.skipped[:_SHOWN]) + (", ..." if len(self.skipped) > _SHOWN else "")
            warnings.warn(
                f"{self.name}: skipped {len(self.skipped)} unreadable image(s) of {len(records)}: {shown}",
                stacklevel=3,
            )
        return kept

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = range(len(self.records))[index]
        r = self.records[index]
        img = TF.pil_to_tensor(load_image(r.path, self.in_chans))
        h, w = img.shape[-2:]
        s = self.image_size
        full = TF.resize(img, [s, s], antialias=True)
        if r.box is None:
            crop = full.clone()
            box = torch.tensor([0.0, 0.0, s, s], dtype=torch.float32)
        else:
            x1, y1, x2, y2 = _fit_box(r, w, h)
            left, top = math.floor(x1), math.floor(y1)
            crop = TF.resized_crop(img, top, left, math.ceil(y2) - top, math.ceil(x2) - left, [s, s], antialias=True)
            box = torch.tensor([x1 * s / w, y1 * s / h, x2 * s / w, y2 * s / h], dtype=torch.float32)
        return {
            "full": full,
            "crop": crop,
            "box": box,
            "label": torch.tensor(r.label, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }
