"""Real pairs (`data.name: paired_folder`): high-quality images under data.root, their low-quality twins under
data.root_lq, both laid out as the folder dataset's root/<split>/<class>/<image> and matched by relative path
(the extension may differ: `a.png` and its JPEG re-encoding `a.jpg`). A twin is the same image at any scale
(e.g. a box-downsampled copy): both are resized to data.image_size.

Each item carries its twin as `lq` (uint8, like `full`); the pair maker makes z from it instead of from x,
then applies T on top (`degradation: none`: z is the twin itself). With `lq_only` (data.test_lq_only) the test
split is root_lq/test alone, real low-quality images without twins, for evaluation only: `full` is the
low-quality image too and the dataset says `lq_only`, so top-1 on x (acc_hq) is not reported.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image
from torchvision.transforms.v2 import functional as TF

from cqd.data import DATASETS
from cqd.data.folder import EXTENSIONS, LAYOUT, class_dirs, image_files, records
from cqd.data.images import FileImageDataset, Record, check_split, existing_root, load_image
from cqd.errors import DataError

WHAT = "paired_folder (data.root_lq)"


def _size(path: Path, skip: bool) -> tuple[int, int] | None:
    """(width, height) from the header (the whole file is decoded when unreadable ones are skipped)."""
    try:
        with Image.open(path) as im:
            size = im.size
            if skip:
                im.draft(None, (1, 1))
                im.load()
        return size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if skip:
            return None
        raise DataError(f"Cannot read image {path}: {e}. Replace the file, or set data.on_corrupt: skip "
                        "to leave unreadable pairs out.") from None


def _by_name(folder: Path) -> dict[str, Path]:
    """{'<class>/<name without extension>': file} of a split folder; two files of one name are an error."""
    out: dict[str, Path] = {}
    for p in image_files(folder):
        key = p.relative_to(folder).with_suffix("").as_posix()
        if key in out:
            raise DataError(f"{out[key]} and {p} are one image name with two extensions; a twin is matched by "
                            "its relative path without the extension, so keep one of them")
        out[key] = p
    return out


def _same_classes(hq: Path, lq: Path) -> None:
    a, b = set(class_dirs(hq)), set(class_dirs(lq))
    for have, lack, names in ((hq, lq, a - b), (lq, hq, b - a)):
        if names:
            raise DataError(f"class folder(s) {', '.join(sorted(names))} of {have} are missing from {lack}: "
                            "the two trees must hold the same classes")


def _shape_matches(hq: tuple[int, int], lq: tuple[int, int]) -> bool:
    """The twin is the image at some scale: its aspect ratio within one pixel of rounding."""
    (w, h), (wl, hl) = hq, lq
    return abs(wl * h - hl * w) <= max(w, h)


def pairs(root, root_lq, split: str, skip: bool = False) -> tuple[list[Record], list[Path], list[str]]:
    """(high-quality records, their twins, class names): every image of root/<split> with its twin in
    root_lq/<split>; a missing twin, an image without a high-quality twin, a class folder in one tree only
    and a twin of another shape are DataErrors naming the file (with `skip`, unreadable pairs are left out)."""
    recs, classes = records(root, split)
    a, b = Path(root).expanduser() / split, existing_root(root_lq, WHAT, f"layout:\n{LAYOUT}") / split
    if not b.is_dir():
        raise DataError(f"{b} does not exist: data.root_lq must hold the same splits as data.root. "
                        f"Expected layout:\n{LAYOUT}")
    _same_classes(a, b)
    twins, kept, lq, dropped = [], [], _by_name(b), []
    for r in recs:
        key = r.path.relative_to(a).with_suffix("").as_posix()
        twin = lq.pop(key, None)
        if twin is None:
            raise DataError(f"{r.path} has no low-quality twin: expected {b / key}.<ext> ({', '.join(EXTENSIONS)})")
        sizes = _size(r.path, skip), _size(twin, skip)
        if None in sizes:
            dropped.append(str(twin if sizes[0] else r.path))
            continue
        if not _shape_matches(*sizes):
            raise DataError(f"{twin} is {sizes[1][0]}x{sizes[1][1]} px, not the shape of its high-quality twin "
                            f"{r.path} ({sizes[0][0]}x{sizes[0][1]} px): a twin is the same image at any scale")
        kept.append(r)
        twins.append(twin)
    if lq:
        raise DataError(f"{next(iter(lq.values()))} has no high-quality twin under {a} "
                        f"({len(lq)} low-quality image(s) without one)")
    if dropped:
        warnings.warn(f"paired_folder: left out {len(dropped)} pair(s) with an unreadable image: "
                      f"{', '.join(dropped[:5])}{', ...' if len(dropped) > 5 else ''}", stacklevel=3)
    return kept, twins, classes


def lq_only_records(root, root_lq, split: str) -> tuple[list[Record], list[str]]:
    """The images of root_lq/<split> alone, labelled by the class folders of root/train."""
    root = existing_root(root, "paired_folder", f"layout:\n{LAYOUT}")
    classes = class_dirs(root / "train") if (root / "train").is_dir() else []
    if not classes:
        raise DataError(f"{root / 'train'} has no class subfolders; the classes come from it. "
                        f"Expected layout:\n{LAYOUT}")
    folder = existing_root(root_lq, WHAT, f"layout:\n{LAYOUT}") / split
    unknown = sorted(set(class_dirs(folder)) - set(classes)) if folder.is_dir() else []
    if unknown:
        raise DataError(f"class folder(s) {', '.join(unknown)} of {folder} are missing from {root / 'train'}")
    out = [Record(p, label) for label, name in enumerate(classes) for p in image_files(folder / name)]
    if not out:
        raise DataError(f"{folder} holds no images with a known extension ({', '.join(EXTENSIONS)})")
    return out, classes


class PairedFolder(FileImageDataset):
    """FileImageDataset whose items also carry `lq`, the low-quality twin at the same size."""

    def __init__(self, recs: list[Record], twins: list[Path], classes: list[str], image_size: int,
                 on_corrupt: str = "error", lq_only: bool = False):
        super().__init__(recs, classes, image_size, on_corrupt=on_corrupt, name="paired_folder")
        twin = dict(zip((Path(r.path) for r in recs), twins))
        self.twins = [twin[r.path] for r in self.records]  # aligned with the records left after skipping
        self.lq_only = lq_only

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        if self.lq_only:
            item["lq"] = item["full"]
        else:
            img = TF.pil_to_tensor(load_image(self.twins[range(len(self))[index]], self.in_chans))
            item["lq"] = TF.resize(img, [self.image_size] * 2, antialias=True)
        return item


@DATASETS.register("paired_folder")
def build(root, split: str, image_size: int, on_corrupt: str = "error", root_lq=None,
          lq_only: bool = False) -> PairedFolder:
    """root/`split` and root_lq/`split` as pairs (`lq_only`: root_lq/`split` alone) at `image_size` px."""
    check_split(split, "paired_folder")
    if lq_only:
        recs, classes = lq_only_records(root, root_lq, split)
        return PairedFolder(recs, [r.path for r in recs], classes, image_size, on_corrupt, lq_only=True)
    recs, twins, classes = pairs(root, root_lq, split, skip=on_corrupt == "skip")
    return PairedFolder(recs, twins, classes, image_size, on_corrupt)
