"""Model factory: the built-in CIFAR nets, tv:/timm: names, and loading weights from files."""
from __future__ import annotations

from urllib.error import URLError

import pytest
import torch
from safetensors.torch import save_file

from cqd.errors import CheckpointError, CQDError
from cqd.models import MODELS, create_model
from cqd.models.factory import list_models

BUILTIN = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet56", "resnet8x4", "resnet32x4",
           "wrn_16_2", "wrn_40_2", "vgg8"]


IMAGE_TO_IMAGE = ["edsr"]  # task sr's networks (tests/test_sr.py)


def test_list_models_names_the_builtin_nets():
    assert sorted(BUILTIN + IMAGE_TO_IMAGE) == list_models() == MODELS.names()


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_model(name, in_chans):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=in_chans)
    assert (model.num_classes, model.in_chans) == (10, in_chans)
    with torch.no_grad():
        logits = model(torch.randn(2, in_chans, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    x = torch.randn(2, in_chans, 28, 28)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())

    model.eval()
    with torch.no_grad():
        plain = model(x)
        assert torch.allclose(plain, model.head(model.forward_features(x)))
        model.to(memory_format=torch.channels_last)
        fast = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(plain, fast, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tv:resnet18", "timm:resnet18"])
def test_library_models_get_new_head_and_stem(name):
    model = create_model(name, num_classes=7, in_chans=1)
    assert (model.num_classes, model.in_chans) == (7, 1)
    logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name, hint", [("resnet9", "resnet8"), ("tv:resnet181", "resnet18"),
                                        ("timm:resnet181", "resnet18")])
def test_unknown_names(name, hint):
    with pytest.raises(CQDError, match=name.split(":")[-1]) as info:
        create_model(name, num_classes=10)
    assert hint in str(info.value)


def test_builtin_nets_have_no_downloadable_weights():
    with pytest.raises(CQDError, match="no pretrained weights"):
        create_model("resnet8", num_classes=10, pretrained=True)


def test_failed_download_is_a_clear_error(monkeypatch):
    from torchvision.models import WeightsEnum

    def offline(self, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(CQDError, match=r"tv:resnet18.*hub") as info:
        create_model("tv:resnet18", num_classes=10, pretrained=True)
    assert "pretrained: false" in str(info.value)


def test_downloaded_weights_get_new_head_and_gray_stem(monkeypatch):
    from torchvision.models import WeightsEnum, resnet18

    reference = resnet18().state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: reference)
    model = create_model("tv:resnet18", num_classes=7, in_chans=1, pretrained=True)
    assert model.fc.out_features == 7
    assert torch.allclose(model.conv1.weight, reference["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, reference["layer4.1.conv2.weight"])


def _save(state, path):
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("file, wrap", [("w.pt", None), ("w.pt", "model"), ("w.pth", "state_dict"),
                                        ("w.safetensors", None)])
def test_weights_file_round_trip(tmp_path, file, wrap):
    source = create_model("resnet8", num_classes=10)
    state = source.state_dict()
    path = tmp_path / file
    _save(state if wrap is None else {wrap: state, "epoch": 3}, path)

    same = create_model("resnet8", num_classes=10, pretrained=path)
    assert all(torch.equal(v, state[k]) for k, v in same.state_dict().items())

    torch.manual_seed(1)
    fresh_head = create_model("resnet8", num_classes=5).head.weight
    torch.manual_seed(1)
    other = create_model("resnet8", num_classes=5, pretrained=str(path))
    assert other.head.weight.shape == (5, 64) and torch.equal(other.head.weight, fresh_head)
    body = {k: v for k, v in other.state_dict().items() if not k.startswith("head.")}
    assert body and all(torch.equal(v, state[k]) for k, v in body.items())


def test_rgb_weights_adapt_to_gray_input(tmp_path):
    source = create_model("resnet8", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "rgb.pt")
    gray = create_model("resnet8", num_classes=10, in_chans=1, pretrained=tmp_path / "rgb.pt")
    stem = source.features[0].weight
    assert torch.allclose(gray.features[0].weight, stem.sum(1, keepdim=True))
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(gray.eval()(x), source.eval()(x.expand(-1, 3, -1, -1)), atol=1e-5)


def test_file_without_batchnorm_counters_loads(tmp_path):
    state = create_model("resnet8", num_classes=10).state_dict()
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt")
    model = create_model("resnet8", num_classes=10, pretrained=tmp_path / "old.pt")
    assert torch.equal(model.features[0].weight, state["features.0.weight"])


def test_weights_of_another_architecture(tmp_path):
    path = tmp_path / "wrn.pt"
    torch.save(create_model("wrn_16_2", num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"wrn\.pt.*'resnet8'.*missing: features"):
        create_model("resnet8", num_classes=10, pretrained=path)


def test_unreadable_or_missing_weights_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.pt"):
        create_model("resnet8", num_classes=10, pretrained=tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        create_model("resnet8", num_classes=10, pretrained=tmp_path / "junk.pt")
