"""Issue 31: each method's default follows a named reference implementation, checked against values computed here
from the reference's formula (hand-written normalizations, pooling and batch norm, not the code's own helpers):
AT (the authors' code, RepDistiller, mdistiller), FitNet (RepDistiller's/mdistiller's hint and ConvReg), FT/FEED
(the official FT code's distance and weight; RepDistiller's as a named variant), AFD (the paper's cycle and
transfer layers), SGN (the official D loss and image pool), SR's MATLAB bicubic (by hand from Keys' kernel), and
the legacy values that files written before are read with."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from cqd.data.paired import Pair
from cqd.degradations.imresize import imresize
from cqd.engine.checkpoint import LEGACY_METHOD_KEYS, migrate_config
from cqd.engine.schema import run_config
from cqd.errors import ConfigError
from cqd.experiments.grid import changed
from cqd.methods import METHODS, Step
from cqd.methods.afd import AFD, AFDParams
from cqd.methods.at import ATParams, AttentionTransfer, at_loss
from cqd.methods.feed import FEED, FEEDParams, factor_distance
from cqd.methods.fitnet import FitNet, FitNetParams, conv_reg
from cqd.methods.ft import FactorTransfer, FTParams
from cqd.models import create_model
from cqd.models.taps import FeatureTaps, stage_outputs
from cqd.tasks.sr.data import SRConfig, SRImages, modcrop
from helpers import Score

SAMPLE = torch.zeros(2, 1, 32, 32)


def val(t: torch.Tensor) -> float:
    return float(t.detach())


def unit(v: torch.Tensor) -> torch.Tensor:
    """Each row divided by its L2 norm."""
    return v / v.pow(2).sum(1, keepdim=True).sqrt()


def avg_pool(f: torch.Tensor, k: int) -> torch.Tensor:
    b, c, h, w = f.shape
    return f.reshape(b, c, h // k, k, w // k, k).mean((3, 5))


def at_map(f: torch.Tensor) -> torch.Tensor:
    """The references' at(F): the L2-normalized flattened mean over channels of F^2."""
    return unit(f.double().pow(2).mean(1).flatten(1))


def step_for(teachers: list[nn.Module], layers: list[list[str]], seed: int = 1) -> Step:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 32, 32, generator=g)
    maps, logits = [], []
    for t, names in zip(teachers, layers):
        taps = FeatureTaps(t, names)
        with torch.no_grad():
            logits.append(t(x))
        maps.append(dict(taps.out))
        taps.remove()
    return Step(Pair(x, x * 0.5, torch.arange(4) % 10, torch.zeros(4, 4), torch.arange(4)), logits, maps)


# --- AT -----------------------------------------------------------------------------------------------------------

def test_at_default_is_beta_times_the_sum_of_the_references_loss_over_every_stage():
    torch.manual_seed(0)
    s, t = create_model("resnet8", 10, 1), create_model("resnet14", 10, 1)
    method = AttentionTransfer(s, ATParams(), [t], SAMPLE)
    assert method.pairs == [("features.3", "features.4"), ("features.4", "features.6"), ("features.5", "features.8")]
    step = step_for([t], [[b for _, b in method.pairs]])
    _, losses = method(step)
    want = 1000 * sum(((at_map(method.taps.out[a]) - at_map(step.teacher_features[0][b])) ** 2).mean()
                      for a, b in method.pairs)
    assert val(losses["loss_at"]) == pytest.approx(val(want), rel=1e-5)
    del s.stage_layers  # a net that does not list its stages: each size's last block output
    assert stage_outputs(s, SAMPLE) == ["features.3", "features.4", "features"]


def test_at_pools_the_feature_maps_before_the_attention_map_and_cqd_v1_keeps_its_old_form():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    want = ((at_map(avg_pool(fs, 2)) - at_map(ft)) ** 2).mean()
    assert float(at_loss(fs, ft)) == pytest.approx(val(want), rel=1e-5)
    old = ((unit(avg_pool(fs.double().pow(2).mean(1, keepdim=True), 2).flatten(1)) - at_map(ft)) ** 2).mean()
    assert float(at_loss(fs, ft, pool="attention")) == pytest.approx(val(old), rel=1e-5)
    assert abs(val(want - old)) > 0.01 * val(want)  # the two poolings differ here
    torch.manual_seed(0)
    s, t = create_model("resnet8", 10, 1), create_model("resnet8", 10, 1)
    legacy = AttentionTransfer(s, ATParams(convention="cqd_v1"), [t], SAMPLE)
    assert legacy.pairs == [("features", "features")]
    step = step_for([t], [["features"]])
    _, losses = legacy(step)
    want = 500 * ((at_map(legacy.taps.out["features"]) - at_map(step.teacher_features[0]["features"])) ** 2).mean()
    assert val(losses["loss_at"]) == pytest.approx(val(want), rel=1e-5)


# --- FitNet -------------------------------------------------------------------------------------------------------

def test_fitnet_default_hints_the_middle_stage_through_conv_bn_relu():
    torch.manual_seed(0)
    s, t = create_model("resnet8", 10, 1), create_model("resnet14", 10, 1)
    method = FitNet(s, FitNetParams(), [t], SAMPLE)
    assert (method.hint, method.guided) == ("features.4", "features.6")  # RepDistiller's hint_layer 2: stage 2 of 3
    conv, bn, relu = method.regressor
    assert conv.kernel_size == (1, 1) and conv.bias is not None and isinstance(relu, nn.ReLU)
    step = step_for([t], [["features.6"]])
    _, losses = method(step)
    y = torch.nn.functional.conv2d(method.taps.out["features.4"].detach().double(), conv.weight.double(),
                                   conv.bias.double())
    mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
    r = ((y - mean) / (var + bn.eps).sqrt() * bn.weight.double().view(1, -1, 1, 1)
         + bn.bias.double().view(1, -1, 1, 1)).clamp(min=0)
    want = 100 * ((r - step.teacher_features[0]["features.6"].double()) ** 2).mean()
    assert val(losses["loss_hint"]) == pytest.approx(val(want), rel=1e-5)


CONV, UP = nn.Conv2d, nn.ConvTranspose2d


@pytest.mark.parametrize("s_size, t_size, kind, kernel", [(16, 8, CONV, (3, 3)), (8, 16, UP, (4, 4)),
                                                         (10, 8, CONV, (3, 3)), (8, 8, CONV, (1, 1))])
def test_fitnet_reference_regressor_fits_the_sizes_as_convreg_does(s_size, t_size, kind, kernel):
    reg = conv_reg((2, 32, s_size, s_size), (2, 64, t_size, t_size))
    assert isinstance(reg[0], kind) and reg[0].kernel_size == kernel
    assert reg(torch.rand(2, 32, s_size, s_size)).shape == (2, 64, t_size, t_size)


def test_fitnet_reference_regressor_refuses_sizes_convreg_has_no_conv_for():
    with pytest.raises(ConfigError, match="cannot map the hint's 6x6 map to the guided layer's 16x16"):
        conv_reg((2, 32, 6, 6), (2, 64, 16, 16))


# --- FT and FEED ----------------------------------------------------------------------------------------------------

def test_ft_and_feed_default_to_the_official_ft_codes_distance_and_weight():
    assert FTParams().weight == FEEDParams().weight == 500 and FTParams().distance == FEEDParams().distance == "l1"
    assert FEEDParams(distance="repdistiller").weight == 200 and FEEDParams(beta=7, distance="repdistiller").weight == 7
    torch.manual_seed(0)
    teachers = [create_model("resnet8", 10, 1), create_model("resnet14", 10, 1)]
    feed = FEED(create_model("resnet8", 10, 1), FEEDParams(), teachers, SAMPLE)
    step = step_for(teachers, [[n] for n in feed.guided])
    _, losses = feed(step)
    fs = feed.taps.out[feed.layer].detach()
    for k, t in enumerate(feed.transforms):
        a, b = t(fs).double().flatten(1), step.teacher_features[k][feed.guided[k]].double().flatten(1)
        want = 500 * (unit(a) - unit(b)).abs().mean()
        assert val(losses[f"loss_feed{k + 1}"]) == pytest.approx(val(want), rel=1e-5)
    ft = FactorTransfer(create_model("resnet8", 10, 1), FTParams(), teachers[:1], SAMPLE)
    step = step_for(teachers[:1], [[ft.guided]])
    _, losses = ft(step)
    with torch.no_grad():
        a = ft.translator(ft.taps.out[ft.layer]).double().flatten(1)
        b = ft.paraphraser.encoder(step.teacher_features[0][ft.guided]).double().flatten(1)
    assert val(losses["loss_ft"]) == pytest.approx(val(500 * (unit(a) - unit(b)).abs().mean()), rel=1e-5)


def test_the_repdistiller_distance_is_the_l1_of_attention_maps_of_pooled_factors():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    want = (at_map(avg_pool(a, 2)) - at_map(b)).abs().mean()
    assert float(factor_distance(a, b, "repdistiller")) == pytest.approx(val(want), rel=1e-5)


# --- AFD ------------------------------------------------------------------------------------------------------------

def _afd_losses(method: AFD, a: list[float]):
    method.discs = nn.ModuleList(Score(v) for v in a)
    pair = step_for([], []).pair
    _, adv = method(Step(pair, phase="adv"))
    _, disc = method(Step(pair, phase="disc"))
    return pair, adv, disc


def test_afd_default_runs_the_papers_cycle_each_network_learning_from_the_previous_one():
    torch.manual_seed(0)
    method = AFD(create_model("resnet8", 10, 1), AFDParams(k=3), sample=SAMPLE)
    a = [0.5, 2.0, -1.5]
    pair, adv, disc = _afd_losses(method, a)
    with torch.no_grad():
        m = [net.features(pair.z).mean((1, 2, 3)) for net in method.nets]
    for i, t in enumerate(["", "net2/", "net3/"]):
        j = {0: 2, 1: 0, 2: 1}[i]  # 1 -> 2 -> 3 -> 1: D_2 calls network 1's map real, D_1 network 3's
        assert torch.allclose(adv[f"{t}loss_adv"], ((1 - a[i] * m[i]) ** 2).mean(), atol=1e-6)
        assert torch.allclose(disc[f"{t}loss_disc"], ((1 - a[i] * m[j]) ** 2).mean() + ((a[i] * m[i]) ** 2).mean(),
                              atol=1e-6), t


def test_afd_passes_the_real_map_through_its_own_networks_transfer_layer():
    torch.manual_seed(0)
    method = AFD(create_model("resnet8", 10, 1), AFDParams(models=["resnet8x4"]), sample=SAMPLE)  # 64 vs 256 channels
    assert isinstance(method.transfers[0].proj, nn.Identity) and method.transfers[1].proj[0].in_channels == 256
    a = [0.5, 2.0]
    pair, adv, disc = _afd_losses(method, a)
    with torch.no_grad():
        f1, f2 = method.nets[0].features(pair.z), method.nets[1].features(pair.z)
        m1, m2 = f1.mean((1, 2, 3)), method.transfers[1](f2, (8, 8)).mean((1, 2, 3))  # T_2(F_2), 64 channels
    assert torch.allclose(disc["loss_disc"], ((1 - a[0] * m2) ** 2).mean() + ((a[0] * m1) ** 2).mean(), atol=1e-6)
    assert torch.allclose(disc["net2/loss_disc"], ((1 - a[1] * m1) ** 2).mean() + ((a[1] * m2) ** 2).mean(), atol=1e-6)


# --- SGN ------------------------------------------------------------------------------------------------------------

def _sgn(**params):
    torch.manual_seed(0)
    s = create_model("edsr:blocks=2,feats=4,scale=2,skip=none", 3, 3)
    cls = METHODS.get("sgn")
    method = cls(s, cls.Params(fixed_c=[0, 1, 0], **params), [], torch.zeros(2, 3, 8, 8))
    g = torch.Generator().manual_seed(0)
    z, y = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 16, 16, generator=g)
    c = torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.9, 0.1], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    method.mix = lambda step: c
    return method, Step(Pair(y, z, y, torch.zeros(4, 4), torch.arange(4))), c[:, 1]


def _pool(kept: list, images, shares, g: torch.Generator, size: int):
    """pix2pix/CycleGAN's ImagePool, written out: fill, then swap with probability 1/2."""
    shown = []
    for image, share in zip(images, shares):
        if len(kept) < size:
            kept.append((image, share))
        elif float(torch.rand((), generator=g)) > 0.5:
            k = int(torch.randint(size, (), generator=g))
            kept[k], (image, share) = (image, share), kept[k]
        shown.append((image, share))
    return torch.stack([i for i, _ in shown]), torch.stack([s for _, s in shown])


def test_sgn_discriminator_loss_is_the_official_half_sum_over_a_replay_buffer():
    method, step, share = _sgn(replay=0)
    out, _ = method(step)
    _, losses = method(Step(step.pair, phase="disc"))
    d = method.disc
    per_real, per_fake = ((1 - d(step.pair.y)) ** 2).mean((1, 2, 3)), (d(out.detach()) ** 2).mean((1, 2, 3))
    assert val(losses["loss_disc"]) == pytest.approx(val(0.5 * (share * (per_real + per_fake)).mean()), rel=1e-6)
    # replay 2, kept images in it already: D sees what the pool shows, each image with its own sample's share
    method, step, share = _sgn(replay=2)
    old = [(torch.full((3, 16, 16), v), torch.tensor(s)) for v, s in ((0.1, 0.7), (0.9, 0.2))]
    method.replay.images, method.replay.shares = [i.clone() for i, _ in old], [s.clone() for _, s in old]
    g = torch.Generator()
    g.set_state(method.replay.generator.get_state())
    out, _ = method(step)
    _, losses = method(Step(step.pair, phase="disc"))
    shown, shown_share = _pool(list(old), out.detach(), share, g, 2)
    assert not torch.equal(shown, out.detach())  # the seed's draws swap some images here
    d = method.disc
    want = 0.5 * (share * ((1 - d(step.pair.y)) ** 2).mean((1, 2, 3)) + shown_share * (d(shown) ** 2).mean((1, 2, 3)))
    assert val(losses["loss_disc"]) == pytest.approx(val(want.mean()), rel=1e-6)


def test_sgn_replay_buffer_is_the_image_pool_and_its_state_is_in_the_method_state():
    method, _, _ = _sgn(replay=3)
    pool, g, kept = method.replay, torch.Generator(), []
    g.set_state(pool.generator.get_state())
    batches = [(torch.rand(2, 3, 4, 4), torch.rand(2)) for _ in range(5)]
    for images, shares in batches[:4]:
        got, want = pool.query(images, shares), _pool(kept, images, shares, g, 3)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    fresh, _, _ = _sgn(replay=3)
    state = method.state_dict()
    assert "replay._extra_state" in state
    fresh.load_state_dict(copy.deepcopy(state))
    a, b = pool.query(*batches[4]), fresh.replay.query(*batches[4])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- SR: MATLAB's bicubic -------------------------------------------------------------------------------------------

# Keys' cubic (a = -0.5): (3/2)|x|^3 - (5/2)|x|^2 + 1 on [0, 1], -(1/2)|x|^3 + (5/2)|x|^2 - 4|x| + 2 on (1, 2], in
# 128ths at the offsets these scales meet: k(1/4) = 111, k(3/4) = 29, k(5/4) = -9, k(7/4) = -3.

def _mirror(i: int, n: int) -> int:
    """1-based pixel i past either end, mirrored with the edge repeated (0 -> 1, -1 -> 2, n + 1 -> n)."""
    return 1 - i if i < 1 else (2 * n + 1 - i if i > n else i)


def _halve(n: int) -> np.ndarray:
    """(n/2, n): output j sits at u = 2j - 1/2; the kernel widened to 8 taps, i = 2j-4 .. 2j+3, weights
    k(d/2)/2 for d = 7/2 .. -7/2 (they sum to 1)."""
    a = np.zeros((n // 2, n))
    for j in range(1, n // 2 + 1):
        for p, w in enumerate(np.array([-3, -9, 29, 111, 111, 29, -9, -3]) / 256):
            a[j - 1, _mirror(2 * j - 4 + p, n) - 1] += w
    return a


def _double(n: int) -> np.ndarray:
    """(2n, n): output 2k-1 sits at u = k - 1/4 (taps k-2 .. k+1), output 2k at u = k + 1/4 (taps k-1 .. k+2)."""
    a = np.zeros((2 * n, n))
    for k in range(1, n + 1):
        for p, w in enumerate(np.array([-3, 29, 111, -9]) / 128):
            a[2 * k - 2, _mirror(k - 2 + p, n) - 1] += w
        for p, w in enumerate(np.array([-9, 111, 29, -3]) / 128):
            a[2 * k - 1, _mirror(k - 1 + p, n) - 1] += w
    return a


def test_matlab_bicubic_matches_a_hand_computation_from_keys_kernel():
    g = np.random.default_rng(0)
    x = g.random((8, 6)) * 255
    assert np.allclose(imresize(x, (4, 3)), _halve(8) @ x @ _halve(6).T, atol=1e-9)
    assert np.allclose(imresize(x, (16, 12)), _double(8) @ x @ _double(6).T, atol=1e-9)
    img = g.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # uint8: rounded back to uint8 after rows, then columns
    rows = np.clip(np.floor(np.einsum("ij,jkc->ikc", _halve(8), img.astype(np.float64)) + 0.5), 0, 255)
    want = np.clip(np.floor(np.einsum("ij,kjc->kic", _halve(8), rows) + 0.5), 0, 255).astype(np.uint8)
    got = imresize(img, (4, 4))
    assert got.dtype == np.uint8 and np.array_equal(got, want)


def test_sr_lr_images_are_made_with_matlab_bicubic_by_default_and_pil_by_name():
    assert SRConfig().resize == "matlab"
    cfg = SRConfig(scale=2, train=["text"], test=["page"])
    test = SRImages(cfg, "test")
    hr = test.hr[0].permute(1, 2, 0).numpy()
    want = imresize(modcrop(hr, 2), (hr.shape[0] // 2, hr.shape[1] // 2))
    assert np.array_equal(test.lr[0].permute(1, 2, 0).numpy(), want)
    pil = SRImages(cfg.model_copy(update={"resize": "pil"}), "test")
    assert not torch.equal(pil.lr[0], test.lr[0]) and torch.equal(pil.hr[0], test.hr[0])


# --- files written before -------------------------------------------------------------------------------------------

def test_files_written_before_are_read_with_the_legacy_conventions():
    new = run_config({"method": {"name": "at"}}).model_dump()
    old = copy.deepcopy(new)
    for name, keys in LEGACY_METHOD_KEYS.items():
        for key in keys:
            del old["method"][name][key]
    got = migrate_config(old)["method"]
    assert {n: {k: got[n][k] for k in keys} for n, keys in LEGACY_METHOD_KEYS.items()} == {
        "at": {"convention": "cqd_v1"}, "fitnet": {"convention": "cqd_v1"},
        "afd": {"direction": "next", "real": "raw"}, "sgn": {"d_loss": "cqd_v1", "replay": 0}}
    assert migrate_config(new)["method"]["at"]["convention"] == "reference"  # new files keep theirs
    assert ("method.at.convention", "cqd_v1", "reference") in changed(old, new)  # an old grid cell is not reused
    assert run_config(migrate_config(old)).method.at.convention == "cqd_v1"
    sr = run_config({"task": "sr", "model": "edsr:blocks=1,feats=4"}).model_dump()
    old_sr = copy.deepcopy(sr)
    del old_sr["sr"]["resize"]
    assert run_config(migrate_config(old_sr)).sr.resize == "pil" and migrate_config(sr)["sr"]["resize"] == "matlab"
