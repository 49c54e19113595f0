"""Fashion-MNIST, the embedded default: 60k/10k 28x28 grey items, 10 classes, held in memory.

Looked for in this order: `root` (the CLI's --data-dir), the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist), torchvision's download into ~/.cache/cqd. With the environment
variable CQD_NO_DOWNLOAD=1 (the tests set it) a missing copy is a DataError, never a download. The items are
centred, so `crop == full` and the box is the whole image; the `clutter` degradation makes the
non-localized view.
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from cqd.data import DATASETS
from cqd.data.base import InMemoryImages
from cqd.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_DIR = Path(os.environ.get("CQD_CACHE", Path.home() / ".cache" / "cqd"))
NO_DOWNLOAD = "CQD_NO_DOWNLOAD"  # set (to anything but 0/false/no/off) to forbid the download fallback
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
HOW_TO_GET = (
    "Fashion-MNIST was not found. cqd looks in --data-dir (or data.root), then in "
    f"{DEBIAN_DIR} (Debian/Ubuntu: `apt-get install dataset-fashion-mnist`), then downloads it with "
    f"torchvision into {DOWNLOAD_DIR}. To fix: install the Debian package, or put the four files "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz (from the Fashion-MNIST project) in a folder and pass --data-dir FOLDER."
)


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX (MNIST-format) uint8 file, gzipped or not, with clear errors for bad files."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(data) < 8 or data[0:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX uint8 file (bad header); re-download it")
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    n = 1
    for d in dims:
        n *= d
    if len(data) - 4 - 4 * nd != n:
        raise DataError(f"{path} is truncated or corrupt: header says {dims}, "
                        f"found {len(data) - 4 - 4 * nd} bytes of data")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * nd).view(*dims)


def _find(folder: Path, stem: str) -> Path | None:
    for sub in (folder, folder / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (sub / name).is_file():
                return sub / name
    return None


def download_allowed() -> bool:
    """False when $CQD_NO_DOWNLOAD is set to a true value (offline machines, the test suite)."""
    return os.environ.get(NO_DOWNLOAD, "").strip().lower() in ("", "0", "false", "no", "off")


def _locate(root: str | None, split: str) -> tuple[Path, Path]:
    stems = FILES[split]
    if root is not None:
        found = [_find(Path(root), s) for s in stems]
        if None in found:
            raise DataError(f"--data-dir {root} has no {stems[found.index(None)]}[.gz]. " + HOW_TO_GET)
        return found[0], found[1]
    for folder in (DEBIAN_DIR, DOWNLOAD_DIR):
        found = [_find(folder, s) for s in stems]
        if None not in found:
            return found[0], found[1]
    if not download_allowed():
        raise DataError(
            f"Fashion-MNIST ({split}) is in neither {DEBIAN_DIR} nor {DOWNLOAD_DIR}, and {NO_DOWNLOAD}="
            f"{os.environ.get(NO_DOWNLOAD)!r} forbids downloading it. To fix: on Debian/Ubuntu `apt-get install "
            "dataset-fashion-mnist` (it installs the files in /usr/share/datasets/fashion-mnist), or put the four "
            "files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            f"t10k-labels-idx1-ubyte.gz in a folder and pass --data-dir FOLDER, or unset {NO_DOWNLOAD}."
        )
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(DOWNLOAD_DIR), train=split == "train", download=True)
    except Exception as e:  # any network failure means: tell the user how to get the files
        raise DataError(f"{HOW_TO_GET} (download failed: {type(e).__name__}: {e})") from None
    found = [_find(DOWNLOAD_DIR, s) for s in stems]
    if None in found:
        raise DataError(HOW_TO_GET)
    return found[0], found[1]


class FashionMNIST(InMemoryImages):
    """The whole split as one uint8 tensor (N, 1, S, S); `__getitems__` serves a batch with one slice."""

    classes = CLASSES
    num_classes = 10
    in_chans = 1
    mean, std = (0.286,), (0.353,)

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int):
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"Fashion-MNIST images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in count")
        x = images[:, None]
        if image_size != x.shape[-1]:
            x = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                              align_corners=False)
            x = x.round().clamp(0, 255).to(torch.uint8)
        super().__init__(x, labels)


@functools.lru_cache(maxsize=4)
def _load(img_path: Path, lbl_path: Path, image_size: int) -> FashionMNIST:
    """Decoded and resized once per process: a grid of runs reuses it (the tensors are never written to)."""
    return FashionMNIST(read_idx(img_path), read_idx(lbl_path), image_size)


@DATASETS.register("fashion_mnist")
def build(root: str | None, split: str, image_size: int = 32, on_corrupt: str = "error") -> FashionMNIST:
    if split not in FILES:
        raise DataError(f"unknown split {split!r} for fashion_mnist; use 'train' or 'test'")
    img_path, lbl_path = _locate(root, split)
    return _load(img_path, lbl_path, image_size)
