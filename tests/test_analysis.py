"""Saliency tau, the multi-quality router, and `cqd multires` / `cqd explain` end to end on a tiny budget."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cqd.analysis.multires import ROWS, score
from cqd.analysis.saliency import input_gradient, tau
from cqd.cli import main
from cqd.data.fashion_mnist import DEBIAN_DIR, DOWNLOAD_DIR, FILES, _find
from cqd.data.paired import Pair
from cqd.engine.model_files import load_model
from cqd.engine.trainer import train
from cqd.models import create_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["data.image_size=16", "data.train_subset=256", "data.test_subset=128", "train.epochs=1",
        "train.max_steps_per_epoch=2", "train.batch_size=64", "train.progress=false", "train.accelerator=cpu"]


class Linear(nn.Module):
    """logits_k = sum_{c,i} weight[k, c, i] * image[c, i]: its input gradient is known in closed form."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x, self.weight)


def test_tau_is_one_when_the_gradient_lies_only_inside_the_box():
    mask = torch.zeros(32, 32)
    mask[6:14, 4:12] = 1
    model = Linear(torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * mask)
    images, labels = torch.rand(3, 1, 32, 32), torch.tensor([0, 1, 2])
    G = input_gradient(model, images, labels)
    assert (G[:, mask == 1] > 0).all() and (G[:, mask == 0] == 0).all()
    boxes = torch.tensor([[4.0, 6.0, 12.0, 14.0], [3.6, 5.3, 12.2, 14.9], [20.0, 20.0, 30.0, 30.0]])
    assert tau(G, boxes).tolist() == [1.0, 1.0, 0.0]
    assert tau(G, torch.tensor([[4.0, 6.0, 11.5, 14.0]] * 3)).lt(1).all()


def test_tau_is_the_box_area_share_for_a_uniform_gradient():
    model = Linear(torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1).expand(3, 1, 32, 32).clone())
    G = input_gradient(model, torch.rand(3, 1, 32, 32) * 1e-3, torch.tensor([0, 2, 1]))
    assert torch.allclose(G, G[:, :1, :1].expand_as(G)) and (G > 0).all()
    boxes = torch.tensor([[2.5, 4.25, 18.5, 20.75], [-4.0, 20.0, 8.0, 40.0], [0.0, 0.0, 32.0, 32.0]])
    expected = torch.tensor([16 * 16.5, 8 * 12, 32 * 32], dtype=torch.float64) / 1024
    torch.testing.assert_close(tau(G, boxes), expected)


def test_gradient_is_of_the_true_labels_log_likelihood_with_the_l2_norm_over_channels():
    w = torch.zeros(2, 3, 8, 8)
    w[0, 0], w[0, 1] = 3.0, 4.0
    images = torch.rand(2, 3, 8, 8) * 0.05
    G = input_gradient(Linear(w), images, torch.tensor([0, 1]))
    p0 = torch.softmax(torch.einsum("bchw,kchw->bk", images, w).double(), 1)[:, 0]
    torch.testing.assert_close(G[0], torch.full((8, 8), 5 * (1 - p0[0].item())))
    torch.testing.assert_close(G[1], torch.full((8, 8), 5 * p0[1].item()))


def test_gradient_is_per_image_in_eval_mode_and_float32_under_autocast():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_chans=1).train()
    images, labels = torch.rand(4, 1, 16, 16), torch.tensor([0, 3, 5, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        G = input_gradient(model, images, labels, lambda t: (t - 0.5) / 0.25)
    assert not model.training and G.dtype == torch.float32
    torch.testing.assert_close(G[:1], input_gradient(model, images[:1], labels[:1], lambda t: (t - 0.5) / 0.25))
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.3, 1.7, 15.2, 9.9], [-3.0, 4.0, 30.0, 12.0], [5.0, 5.0, 6.0, 6.0]])
    t = tau(G, boxes)
    assert t.isfinite().all() and (t >= 0).all() and (t <= 1).all() and t[0] < 1


class Decoder(nn.Module):
    """Reads the label from the image's mean level, but is off by one on the quality it was not trained on."""

    def __init__(self, wrong_on: str | None):
        super().__init__()
        self.wrong_on = wrong_on

    def forward(self, img):
        y = (img.mean((1, 2, 3)) * 10).floor().long().clamp(0, 9)
        low = _checkered(img)
        wrong = low if self.wrong_on == "lo" else ~low if self.wrong_on == "hi" else torch.zeros_like(low)
        return F.one_hot((y + wrong.long()) % 10, 10).float()


class QualityOracle(nn.Module):
    def forward(self, img):
        return F.one_hot(_checkered(img).long(), 2).float()


class AlwaysLow(nn.Module):
    def forward(self, img):
        return torch.tensor([0.0, 1.0]).expand(img.shape[0], 2)


def _checkered(img):
    return (img[:, 0, 0, 0] - img[:, 0, 0, 1]).abs() > 0.05


def _pairs():
    """x: flat images whose level encodes y; z: the same with a +-0.1 checkerboard (obviously low quality)."""
    y = torch.arange(10).repeat(3)
    x = ((y.double() + 0.5) / 10).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).float()
    checker = (torch.arange(8).view(-1, 1) + torch.arange(8)) % 2 * 0.2 - 0.1
    z = x + checker
    return [Pair(x[i:i + 10], z[i:i + 10], y[i:i + 10], torch.zeros(10, 4), torch.arange(i, i + 10))
            for i in (0, 10, 20)]


def test_router_sends_each_image_to_the_model_for_its_predicted_quality():
    models = {"hq": Decoder("lo"), "cqd": Decoder("hi"), "augment": Decoder(None), "router": QualityOracle()}
    acc = score(models, _pairs())
    assert acc["hq"] == {"hi": 1.0, "lo": 0.0, "hi+lo": 0.5}
    assert acc["cqd"] == {"hi": 0.0, "lo": 1.0, "hi+lo": 0.5}
    assert acc["augment"] == acc["router"] == acc["oracle"] == acc["quality"] == {"hi": 1.0, "lo": 1.0, "hi+lo": 1.0}
    assert set(ROWS) <= set(acc)

    acc = score({**models, "router": AlwaysLow()}, _pairs())
    assert acc["router"] == acc["cqd"] and acc["quality"] == {"hi": 0.0, "lo": 1.0, "hi+lo": 0.5}
    assert acc["oracle"] == {"hi": 1.0, "lo": 1.0, "hi+lo": 1.0}


def _have_fashion_mnist() -> bool:
    return any(all(_find(d, s) for stems in FILES.values() for s in stems) for d in (DEBIAN_DIR, DOWNLOAD_DIR))


needs_data = pytest.mark.skipif(not _have_fashion_mnist(),
                                reason="Fashion-MNIST files not installed (tests never download)")


@needs_data
def test_quality_predictor_trains_through_the_engine_and_tells_heavy_blur_from_sharp(tiny_config, tmp_path):
    """Method `quality`: x -> 0, z -> 1; its acc_hq / acc_lq are the shares of x and z it labels right."""
    cfg = tiny_config(method__name="quality", data__degradation="blur:sigma=3", data__image_size=16,
                      data__train_subset=1024, train__epochs=2, train__max_steps_per_epoch=24)
    res = train(cfg)
    assert res["acc_hq"] >= 0.9 and res["acc_lq"] >= 0.9, res
    model, ck = load_model(tmp_path / "run" / "model.pt", 2, 1)
    assert ck["num_classes"] == 2  # a 2-way head, whatever the dataset's classes
    again = train({**cfg, "out_dir": str(tmp_path / "again")})
    assert again["history"] == [{**r, "images_per_s": a["images_per_s"]}
                                for r, a in zip(res["history"], again["history"])]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One teacher cache for both commands: their f is trained on the same x, so the second one hits."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
@needs_data
def test_multires_end_to_end_then_reuses_its_runs(tmp_path, cache, capsys):
    args = ["multires", "--config", str(CONFIGS / "multires.yaml"), f"out_dir={tmp_path}", f"cache_dir={cache}", *TINY]
    assert main(args) == 0
    assert f"wrote {tmp_path / 'multires.md'}" in capsys.readouterr().out
    res = json.loads((tmp_path / "multires.json").read_text())
    rows = res["rows"]
    assert list(rows) == list(ROWS) and res["n_test"] == 128
    assert rows["oracle"]["hi"] == rows["hq"]["hi"] and rows["oracle"]["lo"] == rows["cqd"]["lo"]
    for r in rows.values():
        assert 0 <= r["hi"] <= 1 and 0 <= r["lo"] <= 1 and r["hi+lo"] == pytest.approx((r["hi"] + r["lo"]) / 2)
    assert 0 <= res["router_accuracy"]["hi+lo"] <= 1
    md = (tmp_path / "multires.md").read_text()
    assert all(f"| {label} | {100 * rows[r]['hi']:.1f} |" in md for r, label in ROWS.items())

    models = sorted(tmp_path.glob("*/model.pt"))
    assert [p.parent.name for p in models] == ["augment", "cqd", "hq", "router"]
    stamps = [p.stat().st_mtime_ns for p in models]
    assert main(args) == 0
    assert capsys.readouterr().out.count("reusing") == 4
    assert [p.stat().st_mtime_ns for p in models] == stamps
    assert json.loads((tmp_path / "multires.json").read_text())["rows"] == rows

    assert main([*args, "train.lr=0.1"]) == 2
    assert "train.lr=0.05 (now 0.1)" in capsys.readouterr().err
    later = models[1].stat().st_mtime + 10
    os.utime(tmp_path / "hq" / "model.pt", (later, later))
    assert main(args) == 2
    assert "was distilled from an older" in capsys.readouterr().err


@pytest.mark.slow
@needs_data
def test_explain_end_to_end(tmp_path, cache, capsys):
    args = ["explain", "--config", str(CONFIGS / "explain.yaml"), "--n", "16", f"out_dir={tmp_path}",
            f"cache_dir={cache}", *TINY]
    assert main(args) == 0
    assert f"wrote {tmp_path / 'saliency.png'}" in capsys.readouterr().out
    for name in ("saliency.png", "tau_scatter.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((tmp_path / "tau.json").read_text())
    tb, tc = torch.tensor(res["tau_B"]), torch.tensor(res["tau_CQD"])
    assert len(tb) == len(tc) == len(res["index"]) == len(res["box"]) == res["n"] == 16
    assert ((tb >= 0) & (tb <= 1) & (tc >= 0) & (tc <= 1)).all()
    assert (res["mean_tau_B"] == pytest.approx(tb.mean().item())
            and res["mean_tau_CQD"] == pytest.approx(tc.mean().item()))
    assert res["share_tau_CQD_above_B"] == pytest.approx((tc > tb).double().mean().item())
    assert any(b != [0.0, 0.0, 16.0, 16.0] for b in res["box"])

    assert main([*args[:5], "data.degradation=lowres:size=8", *args[5:]]) == 2
    assert "tau is 1 for every model" in capsys.readouterr().err
