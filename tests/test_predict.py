"""`cqd predict`: top-1 per image equals the model's own prediction on the evaluation's views, an exported .onnx
gives the .pt's answers (its metadata carries the preprocessing), unreadable images are skipped with a warning
(`--strict`: an error), and a model.pt written before cqd saved its class names is rebuilt from its config or
refused naming what is missing."""
from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from PIL import Image

import cqd.api as api
from cqd import cli
from cqd.engine.loaders import eval_loader
from cqd.engine.model_files import load_model, save_model
from cqd.engine.schema import run_config
from cqd.errors import CheckpointError, DataError
from cqd.tasks import task_of
from helpers import tiny_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model.pt (16-px Fashion-MNIST) and its test images as PNG files, with the model's own top-1 on them."""
    root = tmp_path_factory.mktemp("predict")
    cfg = run_config(tiny_cfg(root, "m", method={"name": "lq"}, data={"train_subset": 64, "test_subset": 24,
                                                                       "image_size": 16, "degradation": "none"}))
    api.train(cfg)
    model, _ = load_model(root / "m" / "model.pt")
    model.eval()
    task = task_of(cfg)
    _, test_ds, _, base = task.build_datasets(cfg)
    maker, want, folder = task.make_maker(cfg, base), {}, root / "images"
    folder.mkdir()
    with torch.no_grad():
        for batch in eval_loader(cfg, test_ds, base):  # what `cqd eval` feeds the model, image by image
            pair = maker(batch, "cpu")
            for i, img, pred in zip(pair.index.tolist(), batch["full"], model(pair.z).argmax(1).tolist()):
                Image.fromarray(img[0].numpy()).save(folder / f"{i:03d}.png")
                want[f"{i:03d}.png"] = base.classes[pred]
    return root, cfg, want


def _top1(rows) -> dict:
    return {r["image"].rsplit("/", 1)[-1]: r["top"][0]["class"] for r in rows}


def test_top1_is_the_models_own_prediction_and_onnx_agrees(trained):
    root, _, want = trained
    rows = api.predict(root / "m" / "model.pt", [root / "images"], top_k=3, batch_size=7, device="cpu")
    assert _top1(rows) == want and all(len(r["top"]) == 3 for r in rows)
    assert all(r["top"][0]["probability"] >= r["top"][1]["probability"] for r in rows)
    onnx_path = api.export(root / "m" / "model.pt", "onnx")["path"]
    import onnx

    meta = {p.key: json.loads(p.value) for p in onnx.load(onnx_path).metadata_props}
    assert meta["classes"][0] == "T-shirt/top" and meta["image_size"] == 16 and meta["in_chans"] == 1
    got = api.predict(onnx_path, [root / "images"], top_k=3)
    assert _top1(got) == want
    for a, b in zip(rows, got):
        assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
        assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-4)


def test_the_command_writes_csv_and_skips_unreadable_images_unless_strict(trained, tmp_path, capsys):
    root, _, want = trained
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    some = sorted((root / "images").iterdir())[:3]
    assert cli.main(["predict", "--model", str(root / "m" / "model.pt"), *map(str, some), str(bad),
                     "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    lines = list(csv.DictReader(io.StringIO(out)))
    assert [(r["image"].rsplit("/", 1)[-1], r["rank"]) for r in lines] == [(p.name, k) for p in some for k in "12"]
    assert all(r["class"] == want[r["image"].rsplit("/", 1)[-1]] for r in lines if r["rank"] == "1")
    assert "broken.png" in err and "skipped 1 unreadable" in err
    assert cli.main(["predict", "--model", str(root / "m" / "model.pt"), str(bad), "--strict"]) == 2
    assert "broken.png" in capsys.readouterr().err
    with pytest.raises(DataError):
        api.predict(root / "m" / "model.pt", [bad], strict=True)


def test_an_older_model_file_is_rebuilt_from_its_config_or_refused(trained, tmp_path, capsys):
    root, cfg, want = trained
    model, ck = load_model(root / "m" / "model.pt")
    save_model(model, cfg, 10, 1, tmp_path / "old.pt")  # no classes, mean, std nor image_size: an older file
    assert _top1(api.predict(tmp_path / "old.pt", [root / "images"])) == want
    lost = cfg.model_copy(update={"data": cfg.data.model_copy(update={"name": "folder", "root": str(tmp_path / "x")})})
    save_model(model, lost, 10, 1, tmp_path / "lost.pt")
    with pytest.raises(CheckpointError, match="holds no classes, mean, std .*rebuilding them from its saved config"):
        api.predict(tmp_path / "lost.pt", [root / "images"])
    assert cli.main(["predict", "--model", str(tmp_path / "lost.pt"), str(root / "images")]) == 2
    assert "holds no classes" in capsys.readouterr().err
