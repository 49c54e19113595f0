"""CUB-200-2011 (Wah et al. 2011): 200 bird species, 11,788 images, one box each, official split.

The paper's main benchmark; read straight from the files of the official tarball.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from cqd.data import DATASETS
from cqd.data.images import FileImageDataset, Record, check_split, existing_root
from cqd.errors import DataError

FOLDER = "CUB_200_2011"
FILES = {
    "images.txt": "<image id> <path under images/>",
    "image_class_labels.txt": "<image id> <class id 1..200>",
    "train_test_split.txt": "<image id> <1 = train, 0 = test>",
    "bounding_boxes.txt": "<image id> <x> <y> <width> <height>",
    "classes.txt": "<class id> <class name>",
}
LAYOUT = (
    f"{FOLDER}/ (root may be this folder or its parent)\n"
    + "".join(f"  {name:<24}{fmt}\n" for name, fmt in FILES.items())
    + "  images/<class folder>/<image>.jpg"
)


def _locate(root: str | Path | None) -> Path:
    root = existing_root(root, "CUB-200-2011", f"layout:\n{LAYOUT}")
    nested = root / FOLDER
    base = nested if nested.is_dir() and not (root / "images.txt").is_file() else root
    missing = [name for name in FILES if not (base / name).is_file()]
    if missing:
        raise DataError(
            f"{base} is not a CUB-200-2011 folder: missing {', '.join(missing)}. Expected layout:\n{LAYOUT}"
        )
    return base


def _flag(fields: list[str]) -> bool:
    if fields[0] not in ("0", "1"):
        raise ValueError(fields[0])
    return fields[0] == "1"


def _box(fields: list[str]) -> tuple[float, float, float, float]:
    x, y, w, h = map(float, fields)
    return x, y, x + w, y + h


def _table(path: Path, width: int, parse: Callable[[list[str]], object]) -> dict[int, object]:
    """`<id> <fields...>` lines keyed by id; the last field may contain spaces."""
    rows: dict[int, object] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        "re-extract CUB_200_2011.tgz") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=width - 1)
        try:
            if len(parts) != width:
                raise ValueError(line)
            key, value = int(parts[0]), parse([p.strip() for p in parts[1:]])
        except ValueError:
            raise DataError(
                f"{path}, line {n}: expected {FILES[path.name]!r}, found {line.strip()!r}"
            ) from None
        if key in rows:
            raise DataError(f"{path}, line {n}: id {key} appears twice")
        rows[key] = value
    return rows


def records(root: str | Path | None, split: str) -> tuple[list[Record], list[str]]:
    """The split's records (0-based labels, xyxy boxes) and the class names, from the annotation files."""
    check_split(split, "cub")
    base = _locate(root)
    named = _table(base / "classes.txt", 2, lambda f: f[0])
    if sorted(named) != list(range(1, len(named) + 1)):
        raise DataError(f"{base / 'classes.txt'}: class ids must run 1..N without gaps; found {sorted(named)}")
    classes = [named[i] for i in range(1, len(named) + 1)]
    paths = _table(base / "images.txt", 2, lambda f: f[0])
    tables = {
        "image_class_labels.txt": _table(base / "image_class_labels.txt", 2, lambda f: int(f[0])),
        "train_test_split.txt": _table(base / "train_test_split.txt", 2, _flag),
        "bounding_boxes.txt": _table(base / "bounding_boxes.txt", 5, _box),
    }
    out = []
    for image_id in sorted(paths):
        for name, table in tables.items():
            if image_id not in table:
                raise DataError(
                    f"{base / name} has no line for image id {image_id} ({paths[image_id]}), which images.txt lists"
                )
        label = tables["image_class_labels.txt"][image_id]
        if not 1 <= label <= len(classes):
            raise DataError(
                f"{base / 'image_class_labels.txt'}: image id {image_id} has class {label}; "
                f"classes.txt defines 1..{len(classes)}"
            )
        if tables["train_test_split.txt"][image_id] == (split == "train"):
            out.append(Record(base / "images" / paths[image_id], label - 1, tables["bounding_boxes.txt"][image_id]))
    if not out:
        raise DataError(f"{base / 'train_test_split.txt'} puts no image in the {split} split")
    return out, classes


@DATASETS.register("cub")
def build(root: str | Path | None, split: str, image_size: int, on_corrupt: str = "error") -> FileImageDataset:
    """CUB-200-2011 `split` ("train" or "test") at `image_size` px, with bird boxes."""
    recs, classes = records(root, split)
    return FileImageDataset(recs, classes, image_size, on_corrupt=on_corrupt, name="cub")
