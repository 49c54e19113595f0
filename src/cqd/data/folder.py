"""Any classification set laid out as root/<split>/<class>/<image>, for data without a dedicated loader.

Class indices follow the sorted folder names of root/train, so train and test agree on them.
No boxes: `crop` is the whole image.
"""
from __future__ import annotations

from pathlib import Path

from cqd.data import DATASETS
from cqd.data.images import SPLITS, FileImageDataset, Record, check_split, existing_root
from cqd.errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LAYOUT = """root/
  train/<class name>/<image>
  test/<class name>/<image>   (test classes must also exist under train/)"""


def class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS
    )


def records(root: str | Path | None, split: str) -> tuple[list[Record], list[str]]:
    """The split's records (label = index of the class folder in sorted train/ folders) and the class names."""
    check_split(split, "folder")
    root = existing_root(root, "folder", f"layout:\n{LAYOUT}")
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise DataError(
            f"{root} has no {' or '.join(s + '/' for s in missing)} subfolder; the folder dataset needs both "
            f"splits. Expected layout:\n{LAYOUT}"
        )
    classes = class_dirs(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'} has no class subfolders. Expected layout:\n{LAYOUT}")
    unknown = sorted(set(class_dirs(root / split)) - set(classes))
    if unknown:
        raise DataError(f"{root / split} has class folder(s) {', '.join(unknown)} that {root / 'train'} lacks")
    out = [Record(p, label) for label, name in enumerate(classes) for p in image_files(root / split / name)]
    if not out:
        raise DataError(f"{root / split} holds no images with a known extension ({', '.join(EXTENSIONS)})")
    return out, classes


@DATASETS.register("folder")
def build(root: str | Path | None, split: str, image_size: int, on_corrupt: str = "error") -> FileImageDataset:
    """root/`split`/<class>/<image> at `image_size` px; no boxes."""
    recs, classes = records(root, split)
    return FileImageDataset(recs, classes, image_size, on_corrupt=on_corrupt, name="folder")
