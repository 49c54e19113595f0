"""`cqd export` / `cqd.api.export`: the written file runs and gives PyTorch's logits (fp32), a wrong file is not
written, and an impossible format is a clear error. The int8 (QAT) exports are in test_compress.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cqd.compress.pruning import Pruner
from cqd.engine.model_files import save_model
from cqd.engine.schema import run_config
from cqd.errors import CQDError
from cqd.models import create_model
from helpers import tiny_cfg


def _saved(tmp_path, name: str, prune: float = 0.0):
    """A model.pt of `name` (random init; the export does not care about training), optionally pruned."""
    cfg = run_config(tiny_cfg(tmp_path, name.replace(":", "_"), model=name))
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1)
    record = None
    if prune:
        pcfg = run_config({"compress": {"prune": {"ratio": prune}}}).compress.prune
        pruner = Pruner(model, pcfg, torch.randn(2, 1, 16, 16), lambda n: [])
        pruner.step()
        record = {"channels": pruner.channels(), "qat": False, "chw": [1, 16, 16]}
    path = tmp_path / name.replace(":", "_") / "model.pt"
    save_model(model.eval(), cfg, 10, 1, path, record)
    return path, model.eval()


@pytest.mark.parametrize("name, prune", [("resnet8", 0.0), ("wrn_16_2", 0.5), ("timm:mobilenetv3_small_050", 0.0)])
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_onnx_torchscript_and_pt2_files_give_pytorchs_logits(tmp_path, name, prune):
    import onnxruntime as ort

    import cqd.api as api

    path, model = _saved(tmp_path, name, prune)
    x = torch.randn(5, 1, 16, 16)  # another batch size than the export's: the batch dimension is dynamic
    with torch.no_grad():
        want = model(x).numpy()
    for fmt in ("onnx", "torchscript") + (("pt2",) if name == "resnet8" else ()):
        res = api.export(path, fmt)
        assert res["form"] == "fp32" and res["check"]["max_abs_diff"] <= 1e-3 and res["bytes"] > 0
        if fmt == "onnx":  # run the file ourselves, independently of cqd's check
            sess = ort.InferenceSession(res["path"], providers=["CPUExecutionProvider"])
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        elif fmt == "torchscript":
            got = torch.jit.load(res["path"])(x).detach().numpy()
        else:
            got = torch.export.load(res["path"]).module()(x).detach().numpy()
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    if prune:  # the pruned shapes went out: the file holds the smaller conv weights
        import onnx

        sizes = sorted(int(np.prod(t.dims)) for t in onnx.load(str(path.with_name("model.onnx"))).graph.initializer)
        assert sum(sizes) < 0.3 * sum(p.numel() for p in create_model(name, num_classes=10, in_chans=1).parameters())


def test_an_export_whose_file_disagrees_with_pytorch_is_refused_and_not_written(tmp_path, monkeypatch):
    import cqd.export as ex

    path, _ = _saved(tmp_path, "resnet8")
    real = ex._write

    def write_wrong(model, fmt, sample, out):  # a file of other weights: what a broken exporter would give
        with torch.no_grad():
            model.head.bias += 0.01
        real(model, fmt, sample, out)
        with torch.no_grad():
            model.head.bias -= 0.01

    monkeypatch.setattr(ex, "_write", write_wrong)
    with pytest.raises(CQDError, match="differ from PyTorch's by up to 0.01"):
        ex.export_model(path, "torchscript")
    assert not path.with_name("model.ts.pt").exists() and not list(path.parent.glob(".model.ts.pt.*"))


def test_unknown_format_is_a_clear_error(tmp_path):
    import cqd.api as api

    path, _ = _saved(tmp_path, "resnet8")
    with pytest.raises(CQDError, match="unknown export format 'tflite'; choose one of onnx, torchscript, pt2"):
        api.export(path, "tflite")


def test_cli_export_writes_the_file_and_prints_the_check(tmp_path, capsys):
    from cqd.cli import main

    path, _ = _saved(tmp_path, "resnet8")
    assert main(["export", "--model", str(path), "--format", "torchscript", "--out", str(tmp_path / "g.ts")]) == 0
    out = capsys.readouterr().out
    assert '"max_abs_diff"' in out and (tmp_path / "g.ts").is_file()
