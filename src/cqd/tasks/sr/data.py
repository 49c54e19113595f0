"""Super-resolution data (task `sr`): high-resolution images x and their low-resolution twins z = T(x).

T is the usual SR protocol's: each HR image is cropped to a multiple of `sr.scale` ("modcrop"), then
downsampled once with MATLAB's bicubic `imresize` (`cqd.degradations.imresize`: Keys' a = -0.5, the kernel
widened by the scale when shrinking) and rounded to uint8, as the LR images of DIV2K/Set5 were made and every
SR paper's numbers assume. The bicubic baseline is the same resize's upsampling of that LR image.
`sr.resize: pil` uses PIL's bicubic for both instead (cqd before the key; its pixels differ from MATLAB's by
up to about 12 levels, its PSNR-Y by thousandths of a dB), which files written before it are read with. Training
crops random aligned patches on the device (see `cqd.tasks.sr.pipeline.PatchMaker`); evaluation uses whole
images.

Sources: `skimage` (the sample images scikit-image ships, no download; the default) and `folder`
(any images under `root/<folder>` for each name in `sr.train` / `sr.test`, e.g. DIV2K's
`DIV2K_train_HR` and Set5's `Set5/HR`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import Dataset

from cqd.degradations.imresize import imresize
from cqd.errors import DataError
from cqd.schema import Strict

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".webp")
# Sample images of scikit-image that need no download (skimage.data); `cat` is chelsea again, and
# the binary or tiny ones (horse, binary_blobs, microaneurysms) are left out.
SKIMAGE_IMAGES = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
                  "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina",
                  "rocket", "stereo_motorcycle", "text")


class SRConfig(Strict):
    """Settings of task `sr` (read only when `task: sr`)."""

    scale: Literal[2, 3, 4] = Field(4, description="upscaling factor: LR = bicubic downsampling of HR by this")
    resize: Literal["matlab", "pil"] = Field("matlab", description="the bicubic that makes LR and the bicubic "
                                             "baseline: matlab, MATLAB's imresize (the published LR images'); pil, "
                                             "PIL's (cqd before the key)")
    patch: int = Field(24, ge=8, le=512, description="side of a training patch in LR pixels "
                                                     "(EDSR: 48, with larger images); HR patch = patch * scale")
    patches_per_epoch: int = Field(1600, ge=1, description="training patches per epoch (each image equally often)")
    augment: bool = Field(True, description="random flips and 90-degree rotations of the training patches")
    source: Literal["skimage", "folder"] = Field("skimage", description="skimage: scikit-image's sample images "
                                                 "(offline); folder: image files under root/<each name>")
    root: str | None = Field(None, description="folder source: the folder holding the train and test folders; "
                                               "default data.root (--data-dir)")
    train: list[str] = Field(["hubble_deep_field", "retina", "stereo_motorcycle", "colorwheel", "logo", "brick",
                              "camera", "cell", "clock", "coins", "grass", "gravel", "moon", "page", "text"],
                             min_length=1, description="skimage: image names; folder: folders under root")
    test: list[str] = Field(["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"], min_length=1,
                            description="held-out images (skimage names) or folders (under root)")
    teacher_epochs: int | None = Field(None, ge=1, description="epochs of the teacher's own training run; "
                                                              "default train.epochs")

    @model_validator(mode="after")
    def _names(self) -> "SRConfig":
        if self.source == "skimage":
            for key in ("train", "test"):
                bad = [n for n in getattr(self, key) if n not in SKIMAGE_IMAGES]
                if bad:
                    raise ValueError(f"sr.{key}: {', '.join(map(repr, bad))} not among scikit-image's offline sample "
                                     f"images: {', '.join(SKIMAGE_IMAGES)}")
            both = sorted(set(self.train) & set(self.test))
            if both:
                raise ValueError(f"sr.train and sr.test share {', '.join(both)}: "
                                 "held-out images must not be trained on")
        return self


def _rgb(a: np.ndarray, name: str) -> np.ndarray:
    """uint8 HxWx3: gray images repeated over 3 channels, RGBA composed over white."""
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        raise DataError(f"image {name} has dtype {a.dtype}; SR images must be 8-bit")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[..., 3:].astype(np.float32) / 255
        a = np.round(a[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])


def load_images(cfg: SRConfig, split: str, root: str | None = None) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 HxWx3) of the split's HR images; `root` (data.root) where sr.root is unset."""
    names = cfg.train if split == "train" else cfg.test
    if cfg.source == "skimage":
        import skimage.data

        out = []
        for n in names:
            a = getattr(skimage.data, n)()
            out.append((n, _rgb(a[0] if isinstance(a, tuple) else a, n)))
        return out
    from PIL import Image

    root = cfg.root or root
    if root is None:
        raise DataError("sr.source=folder needs sr.root (or data.root, --data-dir): the folder holding "
                        f"{', '.join(names)} (e.g. /data/sr with DIV2K/DIV2K_train_HR and Set5/HR in it)")
    out = []
    for n in names:
        folder = Path(root) / n
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS) if folder.is_dir() else []
        if not files:
            raise DataError(f"sr.{split}: no images ({', '.join(EXTENSIONS)}) under {folder}; "
                            f"check the root {root} (sr.root or data.root) and the folder name {n!r}")
        for p in files:
            try:
                with Image.open(p) as im:
                    out.append((str(p.relative_to(root)),
                                _rgb(np.asarray(im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")),
                                     str(p))))
            except OSError as e:
                raise DataError(f"cannot read {p}: {e}") from None
    return out


def modcrop(hr: np.ndarray, scale: int) -> np.ndarray:
    h, w = hr.shape[:2]
    return hr[: h - h % scale, : w - w % scale]


def bicubic(img: np.ndarray, size: tuple[int, int], resize: str = "matlab") -> np.ndarray:
    """The bicubic resize of uint8 HxWx3 to (width, height): MATLAB's imresize, or PIL's (`resize: pil`; a = -0.5,
    antialiased when downsampling)."""
    if resize == "matlab":
        return imresize(img, (size[1], size[0]))
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).permute(2, 0, 1).contiguous()  # a copy: PIL arrays are read-only


class SRImages(Dataset):
    """A split's images: `hr[i]`, `lr[i]` (uint8 CxHxW; LR made once), `bicubic[i]` (upsampled LR, test only).

    As a training set its items are `patches_per_epoch` patch slots, slot j drawing from image j mod N
    (the patch is cut on the device); as a test set, one item per whole image.
    `num_classes` is the networks' output channels (RGB), so the engine sizes an image-to-image model as
    it sizes a classifier's head.
    """

    num_classes = 3
    in_chans = 3

    def __init__(self, cfg: SRConfig, split: str, root: str | None = None):
        self.split, self.scale, self.names, self.hr, self.lr, self.bicubic = split, cfg.scale, [], [], [], []
        need = cfg.patch * cfg.scale if split == "train" else cfg.scale * 2
        for name, img in load_images(cfg, split, root):
            hr = modcrop(img, cfg.scale)
            if min(hr.shape[:2]) < need:
                raise DataError(f"sr image {name} is {img.shape[1]}x{img.shape[0]} px, smaller than "
                                f"{'a training patch of ' if split == 'train' else ''}{need} px (sr.patch * sr.scale); "
                                "leave it out of sr." + split + " or lower sr.patch")
            lr = bicubic(hr, (hr.shape[1] // cfg.scale, hr.shape[0] // cfg.scale), cfg.resize)
            self.names.append(name)
            self.hr.append(_chw(hr))
            self.lr.append(_chw(lr))
            if split == "test":
                self.bicubic.append(_chw(bicubic(lr, (hr.shape[1], hr.shape[0]), cfg.resize)))
        self.length = cfg.patches_per_epoch if split == "train" else len(self.hr)
        self.image_size = cfg.patch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {"index": torch.tensor(i)}

    def image_of(self, index: torch.Tensor) -> torch.Tensor:
        return index % len(self.hr)

    @staticmethod
    def collate(items: list[dict]) -> dict:
        return {"index": torch.stack([it["index"] for it in items])}
