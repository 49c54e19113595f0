"""`cqd predict`: the top-k class names and probabilities of image files, by a saved `model.pt` or an exported
`.onnx` file.

Each image is prepared as the model's training images were: decoded with its channels (grey or RGB), resized to
its image size (bilinear, antialiased: what the image-folder datasets do), scaled to [0, 1] and normalized with
the mean and std it was trained with. No degradation is applied: the images are what the student is deployed
on (real low-quality images). The class names and the normalization come from the file: `model.pt` holds them
(older ones are rebuilt from their saved config, or refused naming what is missing) and `cqd export` writes
them into the ONNX file's metadata. Images go through the model in batches, on the CPU or a GPU (`.pt`; ONNX
runs in onnxruntime on the CPU).
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

from cqd.data.folder import EXTENSIONS
from cqd.data.images import load_image
from cqd.errors import CheckpointError, CQDError, DataError

FIELDS = ("image", "rank", "class", "index", "probability")


def find_images(inputs) -> list[Path]:
    """The files given, and the images (known extensions) under the folders given, sorted; a path that does
    not exist is an error."""
    out: list[Path] = []
    for item in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                          and f.suffix.lower() in EXTENSIONS)
        elif p.is_file():
            out.append(p)
        else:
            raise CQDError(f"{p} does not exist: give image files or folders of images")
    if not out:
        raise CQDError(f"no images ({', '.join(EXTENSIONS)}) in {', '.join(map(str, inputs))}")
    return out


def onnx_meta(path: Path) -> dict:
    """The preprocessing `cqd export` wrote into an ONNX file's metadata_props."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    missing = [k for k in ("classes", "mean", "std", "image_size", "in_chans") if k not in props]
    if missing:
        raise CheckpointError(f"{path} holds no {', '.join(missing)} in its metadata: export the model.pt again "
                              "with this cqd (`cqd export --format onnx`), which writes them")
    return {k: json.loads(props[k]) for k in ("classes", "mean", "std", "image_size", "in_chans")}


def load_predictor(path: str | Path, device: str = "auto"):
    """(logits of a float batch (N, C, S, S) as a tensor, the model's preprocessing, the device it runs on)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from cqd.export import runner

        run = runner(path, "onnx")
        return (lambda x: torch.from_numpy(run(x.cpu().numpy()))), onnx_meta(path), torch.device("cpu")
    from cqd.compress.compressor import deployed
    from cqd.engine.model_files import load_model, preprocessing

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    model, ck = load_model(path)
    if ck.get("sym") is not None:
        raise CQDError(f"{path} is conditioned on a quality mix c (method sgn/symcqd); predict takes plain "
                       "classifiers")
    meta = preprocessing(ck, path)
    model.eval()
    model, _ = deployed(model, ck, path)
    model = model.to(dev, memory_format=torch.channels_last)  # as training ran it: on CPUs several times faster
    from cqd.engine.precision import flush_denormals

    @torch.no_grad()
    def run(x):
        with flush_denormals():
            return model(x.to(dev).contiguous(memory_format=torch.channels_last)).float()

    return run, meta, dev


def prepare(path: Path, meta: dict) -> torch.Tensor:
    """uint8 (C, S, S): the image decoded with the model's channels and resized as its training images were."""
    img = TF.pil_to_tensor(load_image(path, meta["in_chans"]))
    return TF.resize(img, [meta["image_size"]] * 2, antialias=True)


def predict(model_path: str | Path, inputs, top_k: int = 5, batch_size: int = 64, device: str = "auto",
            strict: bool = False) -> list[dict]:
    """[{"image", "top": [{"class", "index", "probability"}, ...]}] per readable image, best first. An unreadable
    image is skipped with a warning naming it (`strict`: a DataError)."""
    run, meta, dev = load_predictor(model_path, device)
    mean = torch.tensor(meta["mean"], dtype=torch.float32, device=dev).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32, device=dev).view(1, -1, 1, 1)
    classes, rows, skipped = meta["classes"], [], []
    files = find_images(inputs)
    for start in range(0, len(files), batch_size):
        names, images = [], []
        for f in files[start:start + batch_size]:
            try:
                images.append(prepare(f, meta))
                names.append(f)
            except DataError:
                if strict:
                    raise
                skipped.append(str(f))
        if not images:
            continue
        x = (torch.stack(images).to(dev).float().div_(255) - mean) / std
        probs = torch.softmax(run(x).float(), 1)
        if probs.shape[1] != len(classes):
            raise CheckpointError(f"{model_path} gives {probs.shape[1]} outputs but names {len(classes)} classes")
        p, idx = probs.topk(min(top_k, len(classes)), 1)
        for name, pv, iv in zip(names, p.tolist(), idx.tolist()):
            rows.append({"image": str(name), "top": [{"class": classes[i], "index": i, "probability": v}
                                                     for v, i in zip(pv, iv)]})
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) (--strict makes this an error): "
                      f"{', '.join(skipped)}", stacklevel=2)
    return rows


def format_predictions(rows: list[dict], fmt: str = "csv") -> str:
    """CSV (one line per image and rank: image, rank, class, index, probability) or JSON (the rows)."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt != "csv":
        raise CQDError(f"unknown prediction format {fmt!r}; use csv or json")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FIELDS)
    for r in rows:
        w.writerows((r["image"], k + 1, t["class"], t["index"], f"{t['probability']:.6f}")
                    for k, t in enumerate(r["top"]))
    return buf.getvalue()


def write_predictions(rows: list[dict], out: str | Path | None = None, fmt: str | None = None) -> str:
    """The predictions as `fmt` (default: json for an `out` ending in .json, else csv) written to `out`; returns
    the text to print (the predictions themselves without `out`)."""
    from cqd.files import save_text

    text = format_predictions(rows, fmt or ("json" if str(out or "").lower().endswith(".json") else "csv"))
    if out is None:
        return text
    save_text(text, out)
    return f"wrote {out} ({len(rows)} images)\n"
