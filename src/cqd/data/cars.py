"""Stanford Cars (Krause et al. 2013): 196 car models, 16,185 images, one box each, official split.

Reads either the devkit release or the single-file `cars_annos.mat` release. Boxes there are
1-based inclusive pixel indices; pixel i covers [i-1, i) in 0-based coordinates, so a box
(x1, y1, x2, y2) becomes (x1 - 1, y1 - 1, x2, y2).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from cqd.data import DATASETS
from cqd.data.images import FileImageDataset, Record, check_split, existing_root
from cqd.errors import DataError

BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
TEST_ANNOS = "cars_test_annos_withlabels.mat"
LAYOUTS = f"""either the devkit release:
  devkit/cars_meta.mat            class_names
  devkit/cars_train_annos.mat     annotations: {', '.join(BOX_FIELDS)}, class, fname
  {TEST_ANNOS}  (here or in devkit/; same fields)
  cars_train/<fname>, cars_test/<fname>
or the single-file release:
  cars_annos.mat                  annotations: relative_im_path, {', '.join(BOX_FIELDS)}, class, test; class_names
  car_ims/<image>.jpg"""


def _loadmat(path: Path) -> dict:
    try:
        return scipy.io.loadmat(path, squeeze_me=True)
    except (MatReadError, ValueError, OSError, NotImplementedError, TypeError) as e:
        raise DataError(f"Cannot read MATLAB file {path}: {e}") from None


def _var(mat: dict, path: Path, key: str):
    if key not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
        raise DataError(f"{path} has no variable {key!r} (found: {found})")
    return mat[key]


def _class_names(mat: dict, path: Path) -> list[str]:
    return [str(n) for n in np.atleast_1d(_var(mat, path, "class_names"))]


def _annotations(mat: dict, path: Path, fields: tuple[str, ...]) -> list[dict]:
    """The `annotations` struct array as one dict per image; squeeze_me turns a single struct into a 0-d record."""
    arr = np.atleast_1d(_var(mat, path, "annotations"))
    names = arr.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise DataError(
            f"{path}: 'annotations' lacks field(s) {', '.join(missing)} (has: {', '.join(names) or 'none'})"
        )
    rows = []
    for i, row in enumerate(arr):
        try:
            rows.append({f: (str(row[f]) if f in ("fname", "relative_im_path") else float(row[f])) for f in fields})
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: annotation {i + 1} has a malformed field ({e})") from None
    return rows


def _record(row: dict, image: Path, classes: list[str], path: Path) -> Record:
    label = int(row["class"])
    if label != row["class"] or not 1 <= label <= len(classes):
        raise DataError(f"{path}: image {image.name} has class {row['class']:g}; "
                        f"the class names define 1..{len(classes)}")
    x1, y1, x2, y2 = (row[f] for f in BOX_FIELDS)
    return Record(image, label - 1, (x1 - 1, y1 - 1, x2, y2))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"Stanford Cars {what} {path} is missing. Expected {LAYOUTS}")
    return path


def _devkit(root: Path, split: str) -> tuple[list[Record], list[str]]:
    meta = _require(root / "devkit" / "cars_meta.mat", "class-name file")
    classes = _class_names(_loadmat(meta), meta)
    if split == "train":
        annos = _require(root / "devkit" / "cars_train_annos.mat", "annotation file")
    else:
        places = [root / TEST_ANNOS, root / "devkit" / TEST_ANNOS]
        annos = next((p for p in places if p.is_file()), None)
        if annos is None:
            raise DataError(
                f"Stanford Cars test labels {TEST_ANNOS} are in neither {places[0].parent} nor {places[1].parent} "
                "(devkit/cars_test_annos.mat has no labels; the labelled file is a separate download)."
            )
    images = _require(root / f"cars_{split}", "image folder")
    fields = (*BOX_FIELDS, "class", "fname")
    rows = _annotations(_loadmat(annos), annos, fields)
    return [_record(r, images / r["fname"], classes, annos) for r in rows], classes


def _single_file(root: Path, split: str) -> tuple[list[Record], list[str]]:
    annos = root / "cars_annos.mat"
    mat = _loadmat(annos)
    if "class_names" in mat:
        classes = _class_names(mat, annos)
    else:
        meta = _require(root / "devkit" / "cars_meta.mat", "class-name file")
        classes = _class_names(_loadmat(meta), meta)
    fields = ("relative_im_path", *BOX_FIELDS, "class", "test")
    rows = [r for r in _annotations(mat, annos, fields) if bool(r["test"]) == (split == "test")]
    return [_record(r, root / r["relative_im_path"], classes, annos) for r in rows], classes


def records(root: str | Path | None, split: str) -> tuple[list[Record], list[str]]:
    """The split's records (0-based labels, 0-based xyxy boxes) and the class names."""
    check_split(split, "cars")
    root = existing_root(root, "Stanford Cars", LAYOUTS)
    if (root / "devkit" / "cars_train_annos.mat").is_file() or (
        (root / "devkit").is_dir() and not (root / "cars_annos.mat").is_file()
    ):
        recs, classes = _devkit(root, split)
    elif (root / "cars_annos.mat").is_file():
        recs, classes = _single_file(root, split)
    else:
        raise DataError(f"{root} is not a Stanford Cars folder: it has neither devkit/ nor cars_annos.mat. "
                        f"Expected {LAYOUTS}")
    if not recs:
        raise DataError(f"The Stanford Cars annotations in {root} list no image in the {split} split")
    return recs, classes


@DATASETS.register("cars")
def build(root: str | Path | None, split: str, image_size: int, on_corrupt: str = "error") -> FileImageDataset:
    """Stanford Cars `split` ("train" or "test") at `image_size` px, with car boxes."""
    recs, classes = records(root, split)
    return FileImageDataset(recs, classes, image_size, on_corrupt=on_corrupt, name="cars")
