"""CUB, Stanford Cars, folder and Fashion-MNIST loaders on tiny trees written in the published layouts,
checked against what the fixture wrote (files, labels, boxes) and against PIL's decoding and resizing."""
from __future__ import annotations

import gzip
import io
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from cqd.data import DATASETS, cars, cub, fashion_mnist, folder
from cqd.data.images import FileImageDataset, Record, load_image
from cqd.errors import DataError

S = 16
BACKGROUND = (20, 40, 200)
OBJECT = (230, 30, 30)
SIZES = [(40, 30), (30, 40), (50, 36)]
BOXES = [(10, 6, 30, 21), (5, 10, 25, 30), (12, 8, 40, 28)]  # 0-based xyxy, one per size
FIRST_BOX_IN_FULL = [10 * S / 40, 6 * S / 30, 30 * S / 40, 21 * S / 30]
# (class, size/box slot, train?) for 9 images: per class two train, one test
SPECS = [(c, k, k < 2) for c in range(3) for k in range(3)]
CUB_CLASSES = ["001.Red_bird", "002.Blue_bird", "003.Green_bird"]
CAR_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]


def paint(path: Path, size: tuple[int, int], box: tuple[int, int, int, int] | None = None, mode: str = "RGB"):
    """A solid image with the box region in OBJECT colour; JPEGs saved without chroma subsampling."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.empty((size[1], size[0], 3), np.uint8)
    arr[:] = BACKGROUND
    if box is not None:
        x1, y1, x2, y2 = box
        arr[y1:y2, x1:x2] = OBJECT
    img = Image.fromarray(arr).convert(mode)
    if path.suffix == ".jpg":
        img.save(path, quality=95, subsampling=0)
    else:
        img.save(path)


def truncated_jpeg() -> bytes:
    """A noisy JPEG cut inside its entropy-coded data, so the header still parses."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) * 2 // 3]


# --- fixture trees -----------------------------------------------------------------------------


def make_cub(parent: Path) -> Path:
    base = parent / "CUB_200_2011"
    images, labels, split, boxes = [], [], [], []
    for i, (c, k, train) in enumerate(SPECS, 1):
        rel = f"{CUB_CLASSES[c]}/{CUB_CLASSES[c][4:]}_{i:04d}.jpg"
        paint(base / "images" / rel, SIZES[k], BOXES[k])
        x1, y1, x2, y2 = BOXES[k]
        images.append(f"{i} {rel}")
        labels.append(f"{i} {c + 1}")
        split.append(f"{i} {int(train)}")
        boxes.append(f"{i} {x1:.1f} {y1:.1f} {x2 - x1:.1f} {y2 - y1:.1f}")
    write_lines(base / "images.txt", images)
    write_lines(base / "image_class_labels.txt", labels)
    write_lines(base / "train_test_split.txt", split)
    write_lines(base / "bounding_boxes.txt", boxes)
    write_lines(base / "classes.txt", [f"{i} {name}" for i, name in enumerate(CUB_CLASSES, 1)])
    return base


def write_lines(path: Path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")


def struct_array(rows: list[dict]) -> np.ndarray:
    """A 1xN MATLAB struct array, fields as in the real files (1x1 numbers, char arrays)."""
    arr = np.empty((1, len(rows)), dtype=[(k, object) for k in rows[0]])
    for i, row in enumerate(rows):
        for k, v in row.items():
            arr[k][0, i] = v if isinstance(v, str) else np.array([[v]], dtype=np.uint16)
    return arr


def cell(strings: list[str]) -> np.ndarray:
    return np.array(strings, dtype=object).reshape(1, -1)


def car_box(k: int) -> dict:
    x1, y1, x2, y2 = BOXES[k]
    return {"bbox_x1": x1 + 1, "bbox_y1": y1 + 1, "bbox_x2": x2, "bbox_y2": y2}


def make_cars_devkit(root: Path, test_annos_in_devkit: bool = False) -> Path:
    rows = {"train": [], "test": []}
    for c, k, train in SPECS:
        split = "train" if train else "test"
        fname = f"{len(rows[split]) + 1:05d}.jpg"
        paint(root / f"cars_{split}" / fname, SIZES[k], BOXES[k])
        rows[split].append({**car_box(k), "class": c + 1, "fname": fname})
    (root / "devkit").mkdir(parents=True)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": cell(CAR_CLASSES)})
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": struct_array(rows["train"])})
    test_dir = root / "devkit" if test_annos_in_devkit else root
    scipy.io.savemat(test_dir / cars.TEST_ANNOS, {"annotations": struct_array(rows["test"])})
    return root


def make_cars_single_file(root: Path) -> Path:
    rows = []
    for i, (c, k, train) in enumerate(SPECS, 1):
        rel = f"car_ims/{i:06d}.jpg"
        paint(root / rel, SIZES[k], BOXES[k])
        rows.append({"relative_im_path": rel, **car_box(k), "class": c + 1, "test": int(not train)})
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": struct_array(rows), "class_names": cell(CAR_CLASSES)})
    return root


def make_folder(root: Path) -> Path:
    for c, name in enumerate(["dog", "cat", "eel"]):
        for k in range(3):
            split = "train" if k < 2 else "test"
            suffix = ".png" if k == 1 else ".jpg"
            paint(root / split / name / f"{name}{k}{suffix}", SIZES[k], mode="L" if c == 2 else "RGB")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


BUILDERS = {
    "cub": (make_cub, cub.build),
    "cars-devkit": (make_cars_devkit, cars.build),
    "cars-single-file": (make_cars_single_file, cars.build),
    "folder": (make_folder, folder.build),
}
BOXED = ["cub", "cars-devkit", "cars-single-file"]


def build(kind: str, tmp_path: Path, split: str = "train", **kw):
    make, builder = BUILDERS[kind]
    make(tmp_path)
    return builder(tmp_path, split, S, **kw)


def manifest(kind: str, root: Path, split: str) -> dict[Path, tuple[int, tuple | None]]:
    """What the fixture wrote for `split`: image file -> (0-based label, 0-based xyxy box or None),
    worked out from SPECS and the layouts here, not from the loaders."""
    train = split == "train"
    if kind == "folder":
        names = ["dog", "cat", "eel"]  # make_folder's order; labels follow the sorted folder names
        return {root / split / name / f"{name}{k}{'.png' if k == 1 else '.jpg'}": (sorted(names).index(name), None)
                for name in names for k in range(3) if (k < 2) == train}
    out, n = {}, 0
    for i, (c, k, in_train) in enumerate(SPECS, 1):
        if in_train != train:
            continue
        n += 1
        path = {"cub": root / "CUB_200_2011" / "images" / f"{CUB_CLASSES[c]}/{CUB_CLASSES[c][4:]}_{i:04d}.jpg",
                "cars-devkit": root / f"cars_{split}" / f"{n:05d}.jpg",
                "cars-single-file": root / f"car_ims/{i:06d}.jpg"}[kind]
        out[path] = (c, BOXES[k])
    return out


def pil_resized(path: Path, box: tuple | None = None) -> torch.Tensor:
    """The image (or its box, widened to whole pixels) decoded and resized to S x S by PIL."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if box is not None:
            x1, y1, x2, y2 = box
            im = im.crop((math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)))
        return torch.from_numpy(np.array(im.resize((S, S), Image.BILINEAR))).permute(2, 0, 1)


# --- valid trees ------------------------------------------------------------------------------


def test_registered():
    assert DATASETS.get("cub") is cub.build
    assert DATASETS.get("cars") is cars.build
    assert DATASETS.get("folder") is folder.build


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_lengths_labels_and_classes(kind, tmp_path):
    make, builder = BUILDERS[kind]
    make(tmp_path)
    train, test = builder(tmp_path, "train", S), builder(tmp_path, "test", S)
    assert (len(train), len(test)) == (6, 3)
    for ds in (train, test):
        assert len(ds.classes) == ds.num_classes == 3
        assert ds.has_boxes == (kind in BOXED)
        assert ds.image_size == S
    assert sorted(int(train[i]["label"]) for i in range(6)) == [0, 0, 1, 1, 2, 2]
    assert sorted(int(test[i]["label"]) for i in range(3)) == [0, 1, 2]
    expected = {"cub": CUB_CLASSES, "folder": ["cat", "dog", "eel"]}.get(kind, CAR_CLASSES)
    assert train.classes == test.classes == expected


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_every_item_is_its_file_with_its_label_and_box(kind, split, tmp_path):
    """Item i holds the pixels of the file the fixture wrote for it, that file's class and its box."""
    make, builder = BUILDERS[kind]
    make(tmp_path)
    ds, expected = builder(tmp_path, split, S), manifest(kind, tmp_path, split)
    assert sorted(r.path for r in ds.records) == sorted(expected)
    labels = []
    for i, record in enumerate(ds.records):
        item, (label, box) = ds[i], expected[record.path]
        labels.append(int(item["label"]))
        assert int(item["label"]) == label, record.path
        assert (item["full"].int() - pil_resized(record.path).int()).abs().max() <= 1, record.path
        if box is None:
            assert torch.equal(item["crop"], item["full"]) and item["box"].tolist() == [0, 0, S, S]
            continue
        with Image.open(record.path) as im:
            w, h = im.size
        x1, y1, x2, y2 = box
        assert item["box"].tolist() == pytest.approx([x1 * S / w, y1 * S / h, x2 * S / w, y2 * S / h], abs=1e-5)
        assert (item["crop"].int() - pil_resized(record.path, box).int()).abs().max() <= 1, record.path
    assert sorted(labels) == sorted(label for label, _ in expected.values())


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_item_contract(kind, tmp_path):
    ds = build(kind, tmp_path)
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"full", "crop", "box", "label", "index"}
        for key in ("full", "crop"):
            assert item[key].dtype == torch.uint8 and item[key].shape == (3, S, S)
        assert item["box"].dtype == torch.float32 and item["box"].shape == (4,)
        assert item["label"].dtype == torch.int64 and item["label"].shape == ()
        assert item["index"].dtype == torch.int64 and int(item["index"]) == i
    assert int(ds[-1]["index"]) == len(ds) - 1
    with pytest.raises(IndexError):
        ds[len(ds)]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["full"].shape == (4, 3, S, S) and batch["box"].shape == (4, 4)
    assert ds.clutter_bank(3).shape == (3, 3, S, S)


@pytest.mark.parametrize("kind", BOXED)
def test_box_scaled_into_full_and_crop_is_the_object(kind, tmp_path):
    item = build(kind, tmp_path)[0]
    assert item["box"].tolist() == pytest.approx(FIRST_BOX_IN_FULL, abs=1e-5)
    crop_colour = item["crop"].float().mean(dim=(1, 2))
    assert crop_colour.tolist() == pytest.approx(OBJECT, abs=12)
    full_colour = item["full"].float().mean(dim=(1, 2))
    assert abs(full_colour[2] - crop_colour[2]) > 60


@pytest.mark.parametrize("kind", BOXED)
def test_box_region_of_full_is_the_object(kind, tmp_path):
    item = build(kind, tmp_path)[0]
    x1, y1, x2, y2 = item["box"].tolist()
    inner = item["full"][:, int(y1) + 1 : int(y2) - 1, int(x1) + 1 : int(x2) - 1].float().mean(dim=(1, 2))
    assert inner.tolist() == pytest.approx(OBJECT, abs=25)


def test_folder_without_boxes_crop_is_full_and_grayscale_becomes_rgb(tmp_path):
    ds = build("folder", tmp_path)
    for i in range(len(ds)):
        item = ds[i]
        assert torch.equal(item["crop"], item["full"])
        assert item["box"].tolist() == [0.0, 0.0, S, S]
    eel = ds[[r.label for r in ds.records].index(2)]["full"]
    assert torch.equal(eel[0], eel[1]) and torch.equal(eel[1], eel[2])
    assert all(r.path.suffix in (".jpg", ".png") for r in ds.records)


def test_cub_root_may_be_the_dataset_folder_or_its_parent(tmp_path):
    base = make_cub(tmp_path)
    assert len(cub.build(base, "test", S)) == len(cub.build(tmp_path, "test", S)) == 3


def test_cars_test_labels_may_sit_in_devkit(tmp_path):
    make_cars_devkit(tmp_path, test_annos_in_devkit=True)
    ds, expected = cars.build(tmp_path, "test", S), manifest("cars-devkit", tmp_path, "test")
    assert len(ds) == 3
    assert {r.path: (r.label, r.box) for r in ds.records} == expected


def test_cars_single_record_struct(tmp_path):
    make_cars_devkit(tmp_path)
    only = {**car_box(0), "class": 3, "fname": "00001.jpg"}
    scipy.io.savemat(tmp_path / cars.TEST_ANNOS, {"annotations": struct_array([only])})
    ds = cars.build(tmp_path, "test", S)
    assert len(ds) == 1 and int(ds[0]["label"]) == 2
    assert ds.records[0].path == tmp_path / "cars_test" / "00001.jpg" and ds.records[0].box == BOXES[0]
    (x1, y1, x2, y2), (w, h) = BOXES[0], SIZES[2]  # cars_test/00001.jpg is the first test image: slot 2
    assert ds[0]["box"].tolist() == pytest.approx([x1 * S / w, y1 * S / h, x2 * S / w, y2 * S / h], abs=1e-5)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "builder, expected",
    [(cub.build, "images.txt"), (cars.build, "cars_meta.mat"), (folder.build, "train/<class name>")],
)
def test_missing_root_names_path_and_layout(builder, expected, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as e:
        builder(missing, "train", S)
    assert str(missing) in str(e.value) and expected in str(e.value)


@pytest.mark.parametrize("builder", [cub.build, cars.build, folder.build])
def test_unset_root(builder):
    with pytest.raises(DataError, match="needs a root folder"):
        builder(None, "train", S)


def test_cub_missing_annotation_file(tmp_path):
    base = make_cub(tmp_path)
    (base / "bounding_boxes.txt").unlink()
    with pytest.raises(DataError, match="missing bounding_boxes.txt"):
        cub.build(tmp_path, "train", S)


def test_cub_malformed_line_names_file_and_line(tmp_path):
    base = make_cub(tmp_path)
    lines = (base / "train_test_split.txt").read_text().splitlines()
    lines[2] = "3 yes"
    write_lines(base / "train_test_split.txt", lines)
    with pytest.raises(DataError, match=r"train_test_split.txt, line 3: .*'3 yes'"):
        cub.build(tmp_path, "train", S)


def test_cub_id_without_label(tmp_path):
    base = make_cub(tmp_path)
    write_lines(base / "image_class_labels.txt", (base / "image_class_labels.txt").read_text().splitlines()[:-1])
    with pytest.raises(DataError, match=r"image_class_labels.txt has no line for image id 9"):
        cub.build(tmp_path, "train", S)


def test_cars_missing_annotation_files(tmp_path):
    make_cars_devkit(tmp_path)
    (tmp_path / cars.TEST_ANNOS).unlink()
    with pytest.raises(DataError, match=cars.TEST_ANNOS):
        cars.build(tmp_path, "test", S)
    (tmp_path / "devkit" / "cars_train_annos.mat").unlink()
    with pytest.raises(DataError, match="cars_train_annos.mat is missing"):
        cars.build(tmp_path, "train", S)


def test_cars_bad_mat_files(tmp_path):
    make_cars_single_file(tmp_path)
    no_boxes = [{"relative_im_path": "car_ims/000001.jpg", "class": 1, "test": 0}]
    scipy.io.savemat(tmp_path / "cars_annos.mat",
                     {"annotations": struct_array(no_boxes), "class_names": cell(CAR_CLASSES)})
    with pytest.raises(DataError, match="lacks field.*bbox_x1"):
        cars.build(tmp_path, "train", S)
    (tmp_path / "cars_annos.mat").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cars_annos.mat"):
        cars.build(tmp_path, "train", S)


def test_folder_needs_both_splits(tmp_path):
    make_folder(tmp_path)
    for p in sorted((tmp_path / "test").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (tmp_path / "test").rmdir()
    with pytest.raises(DataError, match="no test/ subfolder"):
        folder.build(tmp_path, "train", S)


def test_folder_test_class_unknown_to_train(tmp_path):
    make_folder(tmp_path)
    paint(tmp_path / "test" / "fox" / "fox.png", (8, 8))
    with pytest.raises(DataError, match="fox"):
        folder.build(tmp_path, "test", S)


@pytest.mark.parametrize("builder", [cub.build, cars.build, folder.build])
def test_unknown_split(builder, tmp_path):
    with pytest.raises(DataError, match="Unknown split 'val'.*train, test"):
        builder(tmp_path, "val", S)


def test_unknown_on_corrupt(tmp_path):
    with pytest.raises(DataError, match="'ignore'.*error, skip"):
        build("folder", tmp_path, on_corrupt="ignore")


def corrupt_two(ds) -> list[Path]:
    """Overwrite the first image with garbage bytes and the last with a truncated JPEG."""
    garbage, truncated = ds.records[0].path, ds.records[-1].path
    garbage.write_bytes(b"this is not an image at all")
    truncated.write_bytes(truncated_jpeg())
    return [garbage, truncated]


@pytest.mark.parametrize("kind", ["cub", "folder"])
def test_corrupt_images_raise_on_access(kind, tmp_path):
    ds = build(kind, tmp_path)
    garbage, truncated = corrupt_two(ds)
    with pytest.raises(DataError, match="Cannot read image") as e:
        ds[0]
    assert str(garbage) in str(e.value) and "on_corrupt='skip'" in str(e.value)
    with pytest.raises(DataError, match="truncated") as e:
        ds[len(ds) - 1]
    assert str(truncated) in str(e.value)
    ds[1]


@pytest.mark.parametrize("kind", ["cub", "folder"])
def test_corrupt_images_skipped_with_one_warning(kind, tmp_path):
    bad = corrupt_two(build(kind, tmp_path))
    with pytest.warns(UserWarning, match="skipped 2 unreadable image") as record:
        ds = BUILDERS[kind][1](tmp_path, "train", S, on_corrupt="skip")
    assert len(record) == 1 and str(bad[0]) in str(record[0].message)
    assert ds.skipped == [str(p) for p in bad]
    assert len(ds) == 4 and all(r.path not in bad for r in ds.records)
    assert [int(ds[i]["index"]) for i in range(len(ds))] == [0, 1, 2, 3]


def test_empty_and_missing_image_files(tmp_path):
    ds = build("cub", tmp_path)
    ds.records[0].path.write_bytes(b"")
    ds.records[1].path.unlink()
    with pytest.raises(DataError, match=str(ds.records[0].path)):
        ds[0]
    with pytest.raises(DataError, match="does not exist"):
        ds[1]


def set_cub_box(base: Path, image_id: int, xywh: str):
    lines = (base / "bounding_boxes.txt").read_text().splitlines()
    lines[image_id - 1] = f"{image_id} {xywh}"
    write_lines(base / "bounding_boxes.txt", lines)


def test_box_outside_image(tmp_path):
    base = make_cub(tmp_path)
    set_cub_box(base, 1, "10 6 31.5 20")  # x2 = 41.5 on a 40 px wide image
    ds = cub.build(tmp_path, "train", S)
    with pytest.raises(DataError, match=r"\[10, 6, 41.5, 26\].*001.Red_bird.*outside the 40x30 image"):
        ds[0]
    with pytest.raises(DataError, match="outside"):
        cub.build(tmp_path, "train", S, on_corrupt="skip")


def test_box_within_tolerance_is_clipped(tmp_path):
    base = make_cub(tmp_path)
    set_cub_box(base, 1, "-0.5 6 41 15")
    assert cub.build(tmp_path, "train", S)[0]["box"].tolist() == pytest.approx([0, 3.2, 16, 11.2], abs=1e-5)


def test_zero_sized_box(tmp_path):
    base = make_cub(tmp_path)
    set_cub_box(base, 2, "5 10 0 20")
    with pytest.raises(DataError, match=r"\[5, 10, 5, 30\].*Red_bird_0002.jpg.*zero or negative size"):
        cub.build(tmp_path, "train", S)


def test_cars_inverted_box(tmp_path):
    make_cars_devkit(tmp_path)
    only = {"bbox_x1": 30, "bbox_y1": 7, "bbox_x2": 11, "bbox_y2": 21, "class": 1, "fname": "00001.jpg"}
    scipy.io.savemat(tmp_path / cars.TEST_ANNOS, {"annotations": struct_array([only])})
    with pytest.raises(DataError, match=r"00001.jpg.*zero or negative size"):
        cars.build(tmp_path, "test", S)


def test_load_image_and_base_class_directly(tmp_path):
    paint(tmp_path / "a.png", (12, 9), mode="L")
    assert load_image(tmp_path / "a.png", 3).mode == "RGB"
    assert load_image(tmp_path / "a.png", 1).mode == "L"
    ds = FileImageDataset([Record(tmp_path / "a.png", 0)], ["only"], 8, in_chans=1)
    assert ds[0]["full"].shape == (1, 8, 8)
    with pytest.raises(DataError, match="image_size=0"):
        FileImageDataset([Record(tmp_path / "a.png", 0)], ["only"], 0)


# --- Fashion-MNIST ------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX uint8 file (big-endian dims after a 0 0 8 ndim magic), gzipped when the name ends in .gz."""
    data = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as f:
        f.write(data)


def make_fashion_mnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random 28x28 items in the four files of the Fashion-MNIST project (images gzipped, labels not)."""
    rng, out = np.random.default_rng(0), {}
    for split, prefix, n in (("train", "train", 12), ("test", "t10k", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
        out[split] = images, labels
    return out


@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_mnist_items_are_the_idx_files_pixels_and_labels(split, tmp_path):
    images, labels = make_fashion_mnist(tmp_path)[split]
    ds = DATASETS.get("fashion_mnist")(str(tmp_path), split, image_size=28)
    assert len(ds) == len(labels) and ds.num_classes == len(ds.classes) == 10 and ds.in_chans == 1
    for i in range(len(ds)):
        item = ds[i]
        assert item["full"].dtype == torch.uint8 and item["full"].shape == (1, 28, 28)
        assert np.array_equal(item["full"][0].numpy(), images[i]) and torch.equal(item["crop"], item["full"])
        assert int(item["label"]) == labels[i] and int(item["index"]) == i
        assert item["box"].tolist() == [0, 0, 28, 28]
    batch = ds.__getitems__([3, 0, 4])
    assert torch.equal(batch["full"], torch.stack([ds[i]["full"] for i in (3, 0, 4)]))
    assert batch["label"].tolist() == [int(labels[i]) for i in (3, 0, 4)] and batch["index"].tolist() == [3, 0, 4]


def test_fashion_mnist_resized_like_pil(tmp_path):
    images, _ = make_fashion_mnist(tmp_path)["train"]
    ds = DATASETS.get("fashion_mnist")(str(tmp_path), "train", image_size=16)
    want = np.stack([np.array(Image.fromarray(im).resize((16, 16), Image.BILINEAR)) for im in images])
    got = ds.images[:, 0].numpy().astype(int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1
    assert ds[0]["box"].tolist() == [0, 0, 16, 16]


def test_fashion_mnist_bad_files_name_the_file(tmp_path):
    make_fashion_mnist(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-2])
    with pytest.raises(DataError, match=f"{labels}.*truncated"):
        DATASETS.get("fashion_mnist")(str(tmp_path), "test")
    labels.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(DataError, match=f"{labels} is not an IDX"):
        DATASETS.get("fashion_mnist")(str(tmp_path), "test")
    write_idx(labels, np.zeros(4, np.uint8))  # 5 images, 4 labels
    with pytest.raises(DataError, match=r"images \(5\) and labels \(4\)"):
        DATASETS.get("fashion_mnist")(str(tmp_path), "test")
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        DATASETS.get("fashion_mnist")(str(tmp_path), "train")


def test_fashion_mnist_is_never_downloaded_under_cqd_no_download(tmp_path, monkeypatch):
    """conftest.py sets CQD_NO_DOWNLOAD=1 for every test and child process: a missing copy is a clear
    DataError (where to get the files), and torchvision's download is not even called."""
    import torchvision.datasets

    assert os.environ.get("CQD_NO_DOWNLOAD") == "1"
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(fashion_mnist, "DOWNLOAD_DIR", tmp_path / "cache")
    downloads = []

    def download(root, train, download):
        downloads.append(root)
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", download)
    with pytest.raises(DataError) as e:
        fashion_mnist.build(None, "train")
    for words in ("apt-get install dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist",
                  str(tmp_path / "debian"), "CQD_NO_DOWNLOAD", "--data-dir"):
        assert words in str(e.value)
    assert downloads == []
    monkeypatch.setenv("CQD_NO_DOWNLOAD", "0")  # allowed again: the download is tried (and fails here)
    with pytest.raises(DataError, match="download failed: RuntimeError: network unreachable"):
        fashion_mnist.build(None, "train")
    assert downloads == [str(tmp_path / "cache")]
