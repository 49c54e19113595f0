"""Every registered degradation: shapes, per-(seed, index) determinism, what each does, and spec errors."""
from __future__ import annotations

import io
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.testing import assert_close

from cqd.degradations import DEGRADATIONS, Degradation, parse_degradation
from cqd.errors import CQDError

SPECS = {
    "blur": "blur:sigma=1.5",
    "clutter": "clutter:canvas=48",
    "edges": "edges",
    "gray": "gray",
    "jpeg": "jpeg:quality=50",
    "lowres": "lowres:size=8",
    "noise": "noise:std=0.1",
    "none": "none",
    "tps": "tps:grid=4,sigma=8",
}
RANDOM = {"clutter", "noise", "tps"}
NAMES = DEGRADATIONS.names()
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


def bank(n: int = 12, channels: int = 3, size: int = 28, high: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, channels, size, size), generator=g, dtype=torch.uint8)


def make(spec: str, bank_channels: int = 3) -> Degradation:
    d = parse_degradation(spec)
    d.bind(bank(channels=bank_channels))
    return d


def smooth(b: int, c: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random smooth images: bicubic upsampling of a 4x4 random grid."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, c, 4, 4, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def shapes(b: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright disc and a mid-grey square on a gentle ramp, and their 2 px wide boundaries."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    images, labels = [], []
    for i in range(b):
        disc = (xx - 10 - i) ** 2 + (yy - 11) ** 2 <= 36
        square = (xx >= 17) & (xx < 27) & (yy >= 15 + i) & (yy < 26 + i)
        label = torch.zeros(size, size)
        label[square], label[disc] = 1.0, 2.0
        images.append(0.15 + 0.2 * xx / size + 0.35 * label)
        labels.append(label)
    label = torch.stack(labels)[:, None]
    boundary = F.max_pool2d(label, 3, 1, 1) != -F.max_pool2d(-label, 3, 1, 1)
    return torch.stack(images)[:, None].clamp(0, 1), boundary


def dilate(mask: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(mask.float(), 3, 1, 1) > 0


def high_frequency_energy(x: torch.Tensor, cutoff: int) -> torch.Tensor:
    spectrum = torch.fft.fft2(x - x.mean((-2, -1), keepdim=True)).abs().square()
    f = torch.fft.fftfreq(x.shape[-1]).abs() * x.shape[-1]
    return spectrum[..., torch.maximum(f[:, None], f[None, :]) > cutoff].sum()


def gradient_energy(x: torch.Tensor) -> torch.Tensor:
    return x.diff(dim=-1).square().sum() + x.diff(dim=-2).square().sum()


# --- every degradation --------------------------------------------------------------------------


def test_every_degradation_has_a_spec_here():
    assert set(NAMES) <= set(SPECS), "add a spec for the new degradation to SPECS"


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_device_and_range_kept(name, channels, device):
    x = torch.rand(3, channels, 32, 32, device=device)
    d = make(SPECS[name])
    d.check(channels, 32)
    z, box = d(x, torch.arange(3, device=device))
    assert (z.shape, z.dtype, z.device) == (x.shape, x.dtype, x.device)
    assert 0 <= z.min() and z.max() <= 1 and torch.isfinite(z).all()
    if box is not None:
        assert (box.shape, box.dtype, box.device) == ((3, 4), torch.float32, x.device)


@pytest.mark.parametrize("name", NAMES)
def test_same_index_same_output_whatever_the_batch(name):
    d = make(SPECS[name])
    x, index = smooth(4, 3), torch.tensor([10, 11, 12, 13])
    z, box = d(x, index, seed=3)
    perm = torch.tensor([2, 0, 3, 1])
    z_perm, box_perm = d(x[perm], index[perm], seed=3)
    assert_close(z_perm, z[perm], atol=1e-5, rtol=0)
    mates = torch.cat([smooth(1, 3, seed=7), x[2:3], smooth(2, 3, seed=8)])
    z_mates, box_mates = d(mates, torch.tensor([40, 12, 41, 42]), seed=3)
    assert_close(z_mates[1], z[2], atol=1e-5, rtol=0)
    if box is not None:
        assert_close(box_perm, box[perm])
        assert_close(box_mates[1], box[2])


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_draws_follow_seed_index_and_epoch(name):
    d = make(SPECS[name])
    x = smooth(1, 3).repeat(2, 1, 1, 1)
    same = torch.tensor([5, 5])

    def out(index, seed=0, epoch=None):
        return d(x, index, seed=seed, epoch=epoch)[0]

    def differ(a, b):
        return (a - b).abs().max() > 1e-3

    assert_close(out(same)[0], out(same)[1])
    assert differ(out(same), out(torch.tensor([6, 6])))
    assert differ(out(same), out(same, seed=1))
    assert differ(out(same), out(same, epoch=3))
    assert differ(out(same, epoch=3), out(same, epoch=4))
    assert_close(out(same, epoch=3), out(same, epoch=3))


@pytest.mark.parametrize("name", sorted(set(NAMES) - RANDOM))
def test_deterministic_ones_ignore_seed_index_and_epoch(name):
    d = make(SPECS[name])
    x = smooth(2, 3)
    assert_close(d(x, torch.tensor([0, 1]))[0], d(x, torch.tensor([7, 9]), seed=5, epoch=2)[0])


# --- what each one does -------------------------------------------------------------------------


def test_lowres_removes_high_frequencies():
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    z, box = parse_degradation("lowres:size=8")(x, torch.arange(4))
    assert box is None
    assert high_frequency_energy(z, 4) < high_frequency_energy(x, 4) / 20


def pil_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """PIL's bilinear resize of each float plane (antialiased when shrinking): a second implementation."""
    out = [np.asarray(Image.fromarray(plane.numpy(), mode="F").resize((size, size), Image.BILINEAR))
           for plane in x.reshape(-1, *x.shape[-2:])]
    return torch.from_numpy(np.stack(out)).view(*x.shape[:-2], size, size)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [5, 8, 16])
def test_lowres_is_an_antialiased_downsample_then_a_bilinear_upsample(size, channels):
    x = torch.rand(3, channels, 32, 32, generator=torch.Generator().manual_seed(size))
    z, box = parse_degradation(f"lowres:size={size}")(x, torch.arange(3))
    assert box is None
    assert_close(z, pil_resize(pil_resize(x, size), 32).clamp(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", ["tps", "tps:grid=4,sigma=16"])
def test_tps_moves_pixels_but_keeps_the_content(spec):
    x = smooth(4, 3)
    z, box = parse_degradation(spec)(x, torch.arange(4))
    assert box is None
    assert (z - x).abs().mean() > 1e-3
    for a, b in zip(x, z):
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.8
    assert_close(z.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=0.03, rtol=0)


def test_tps_sigma_scales_with_the_image_and_zero_is_identity():
    x = smooth(2, 1, size=24)
    assert_close(parse_degradation("tps:sigma=0")(x, torch.arange(2))[0], x, atol=1e-5, rtol=0)
    big = F.interpolate(x, size=(96, 96), mode="bilinear", align_corners=False)
    t = parse_degradation("tps:grid=5,sigma=20")
    z_small, z_big = t(x, torch.arange(2))[0], t(big, torch.arange(2))[0]
    down = F.interpolate(z_big, size=(24, 24), mode="bilinear", antialias=True, align_corners=False)
    assert (down - z_small).abs().mean() < 0.25 * (z_small - x).abs().mean()


def test_tps_displacement_grows_with_sigma():
    x = smooth(4, 1)
    moved = [(parse_degradation(f"tps:sigma={s}")(x, torch.arange(4))[0] - x).abs().mean().item() for s in (2, 8, 32)]
    assert 0 < moved[0] < moved[1] < moved[2]


def test_edges_are_sparse_lines_on_the_shapes_boundaries():
    for channels in (1, 3):
        x, boundary = shapes(3)
        z, box = parse_degradation("edges")(x.repeat(1, channels, 1, 1), torch.arange(3))
        assert box is None and set(z.unique().tolist()) <= {0.0, 1.0}
        assert (z[:, :1] == z).all()
        on = z[:, :1] > 0
        assert 0.02 < on.float().mean() < 0.35
        assert dilate(boundary)[on].float().mean() > 0.95
        assert dilate(on)[boundary].float().mean() > 0.9


def _hysteresis_by_flood_fill(edges: torch.Tensor) -> torch.Tensor:
    """Canny's hysteresis written plainly: a breadth-first flood from every strong pixel through
    8-connected weak ones, image by image (independent of both kornia's and cqd's code)."""
    out = torch.zeros_like(edges)
    for b in range(edges.shape[0]):
        e = edges[b, 0].tolist()
        h, w = len(e), len(e[0])
        seen = [[False] * w for _ in range(h)]
        todo = [(i, j) for i in range(h) for j in range(w) if e[i][j] == 1]
        for i, j in todo:
            seen[i][j] = True
        while todo:
            i, j = todo.pop()
            out[b, 0, i, j] = 1
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, c = i + di, j + dj
                    if 0 <= a < h and 0 <= c < w and not seen[a][c] and e[a][c] > 0:
                        seen[a][c] = True
                        todo.append((a, c))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edges_hysteresis_matches_a_flood_fill_and_kornias(seed):
    """The connected-component hysteresis keeps exactly the weak pixels that reach a strong one."""
    import kornia

    from cqd.degradations.edges import hysteresis

    g = torch.Generator().manual_seed(seed)
    # weak (0.5) and strong (1) candidates, dense enough for long chains that touch the borders and
    # cross between rows, several images so that no component leaks from one image into the next
    edges = (torch.rand(3, 1, 23, 31, generator=g) < 0.45).float() * 0.5
    edges[torch.rand(edges.shape, generator=g) < 0.02] = 1.0
    edges[1] = 0.5 * (edges[1] > 0)  # an image with weak pixels only: nothing survives
    expected = _hysteresis_by_flood_fill(edges)
    got = hysteresis(edges)
    assert torch.equal(got, expected)
    assert expected[1].sum() == 0 and 0 < expected.sum() < (edges > 0).sum()
    x = torch.rand(2, 1, 40, 40, generator=g)
    _, unlinked = kornia.filters.canny(x, 0.1, 0.2, hysteresis=False)
    _, linked = kornia.filters.canny(x, 0.1, 0.2, hysteresis=True)
    assert torch.equal(hysteresis(unlinked), linked)


def test_edges_structured_model_runs_the_opencv_detector(tmp_path, monkeypatch):
    model = tmp_path / "model.yml.gz"
    model.write_bytes(b"not really a model")
    loaded = []

    class Detector:
        def detectEdges(self, image):
            assert image.dtype == np.float32 and image.shape == (16, 16, 3)
            return image.mean(-1) * 0.5

    def create(path):
        loaded.append(path)
        return Detector()

    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(ximgproc=types.SimpleNamespace(
        createStructuredEdgeDetection=create)))
    d = parse_degradation(f"edges:model={model}")
    for channels in (1, 3):
        x = smooth(2, 1, size=16).repeat(1, channels, 1, 1)
        z, box = d(x, torch.arange(2))
        assert box is None and z.shape == x.shape
        assert_close(z, x * 0.5)
    assert loaded == [str(model)]


def test_edges_structured_model_needs_opencv_contrib(tmp_path, monkeypatch):
    model = tmp_path / "model.yml.gz"
    model.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(CQDError, match=r"pip install 'cqd-distill\[sed\]'"):
        parse_degradation(f"edges:model={model}")


def test_clutter_box_contains_the_item():
    d = parse_degradation("clutter:canvas=64,min_scale=0.35,max_scale=0.6")
    d.bind(bank(n=20, channels=1, high=60))
    z, box = d(torch.ones(16, 3, 32, 32), torch.arange(16))
    energy = (z.mean(1) - 60 / 255).clamp(min=0)
    pixels = torch.arange(32.0)

    def coverage(x0, y0, x1, y1):
        """Fraction of each pixel inside the box."""
        cx = (torch.clamp(pixels + 1, max=x1) - torch.clamp(pixels, min=x0)).clamp(0, 1)
        cy = (torch.clamp(pixels + 1, max=y1) - torch.clamp(pixels, min=y0)).clamp(0, 1)
        return cy[:, None] * cx[None, :]

    for e, (x0, y0, x1, y1) in zip(energy, box.tolist()):
        inside = coverage(x0, y0, x1, y1)
        assert (e * inside).sum() > 0.9 * e.sum()
        assert (e * coverage(x0 - 1, y0 - 1, x1 + 1, y1 + 1)).sum() > 0.99 * e.sum()
        assert ((e > 0.5) * inside).sum() > 0.7 * inside.sum()
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        for side in (x1 - x0, y1 - y0):
            assert 0.35 * 32 - 1e-4 <= side <= 0.6 * 32 + 1e-4


@pytest.mark.parametrize("bank_channels", [1, 3])
@pytest.mark.parametrize("channels", [1, 3])
def test_clutter_takes_banks_of_either_colour(channels, bank_channels):
    z, box = make("clutter", bank_channels)(smooth(2, channels), torch.arange(2))
    assert z.shape == (2, channels, 32, 32) and box.shape == (2, 4)


def test_clutter_without_or_with_a_bad_bank_says_so():
    with pytest.raises(CQDError, match="clutter needs images to make clutter from"):
        parse_degradation("clutter")(smooth(1, 1), torch.arange(1))
    with pytest.raises(CQDError, match="uint8"):
        parse_degradation("clutter").bind(torch.rand(4, 1, 8, 8))


def pil_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """x coded and decoded by PIL's libjpeg at `quality` (RGB, or L for one channel): the reference codec."""
    out = []
    for image in x:
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        mode = "L" if pixels.shape[-1] == 1 else "RGB"
        buf = io.BytesIO()
        Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(buf, format="JPEG", quality=quality)
        decoded = np.array(Image.open(buf).convert(mode)).reshape(pixels.shape)
        out.append(torch.from_numpy(decoded).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean().item()


@pytest.mark.parametrize("channels, size", [(3, 32), (1, 32), (3, 30), (1, 30)])
def test_jpeg_matches_a_real_jpeg_codec_at_each_quality(channels, size):
    """kornia's differentiable codec lands much closer to libjpeg's output at the same quality than the
    input (or another quality's output) does; lower quality loses more; quality 100 is nearly lossless."""
    x = smooth(4, channels, size=size)
    x = (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    x = (x * 255).round() / 255  # on the 8-bit grid, as libjpeg sees it
    error = {}
    for quality in (10, 50, 100):
        z, box = parse_degradation(f"jpeg:quality={quality}")(x, torch.arange(4))
        assert box is None
        real = pil_jpeg(x, quality)
        assert mse(z, real) < 0.25 * mse(x, real) + 1e-5, f"quality={quality} is not what libjpeg makes"
        error[quality] = mse(z, x)
    assert error[10] > 1.5 * error[50] > 1.5 * error[100]
    assert 10 * math.log10(1 / error[100]) > 30 and 10 * math.log10(1 / error[50]) > 25
    assert error[10] > 1e-4  # it does compress


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian over +-3 sigma (odd size), built here, with reflected borders."""
    k = 2 * int(3 * sigma + 0.5) + 1
    r = torch.arange(k, dtype=torch.float64) - k // 2
    g = torch.exp(-r.square() / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    padded = F.pad(x.double(), (k // 2,) * 4, mode="reflect")
    rows = F.conv2d(padded, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(rows, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c).to(x.dtype)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("sigma", [0.7, 1.5, 3.0])
def test_blur_is_a_gaussian_of_the_given_sigma(sigma, channels):
    x = torch.rand(2, channels, 32, 32, generator=torch.Generator().manual_seed(0))
    z, box = parse_degradation(f"blur:sigma={sigma}")(x, torch.arange(2))
    assert box is None
    assert_close(z, gaussian_blur(x, sigma), atol=1e-5, rtol=0)


def test_blur_keeps_smooth_content_and_lowers_the_gradient_energy():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z, _ = parse_degradation("blur:sigma=1.5")(x, torch.arange(2))
    assert gradient_energy(z) < gradient_energy(x) / 5
    assert z.std() > 0.02  # blurred, not flattened
    s = smooth(2, 3)
    zs, _ = parse_degradation("blur:sigma=1.5")(s, torch.arange(2))
    assert (zs - s).abs().mean() < 0.02 and (zs - s).abs().max() > 1e-4
    assert_close(zs.mean((2, 3)), s.mean((2, 3)), atol=2e-3, rtol=0)


@pytest.mark.parametrize("std", [0.02, 0.1, 0.15])
def test_noise_is_white_gaussian_with_the_requested_std(std):
    x = torch.full((4, 3, 32, 32), 0.5)
    z, box = parse_degradation(f"noise:std={std}")(x, torch.arange(4))
    n = z - x
    assert box is None
    assert abs(n.std().item() - std) < 0.03 * std and abs(n.mean().item()) < 0.05 * std
    assert abs((n.abs() < std).float().mean().item() - 0.6827) < 0.02  # Gaussian, not e.g. uniform
    assert abs((n.abs() < 2 * std).float().mean().item() - 0.9545) < 0.01
    for a, b in ((n[..., 1:], n[..., :-1]), (n[:, 1:], n[:, :-1]), (n[1:], n[:-1])):  # pixels, channels, items
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.05
    assert torch.equal(parse_degradation("noise:std=0")(x, torch.arange(4))[0], x)


def test_noise_is_added_to_the_image_and_clipped():
    x = smooth(2, 3)
    z, _ = parse_degradation("noise:std=0.05")(x, torch.arange(2))
    n = z - x
    inside = (x > 0.2) & (x < 0.8)  # 6 std from 0 and 1: clipping never bites
    assert abs(n[inside].std().item() - 0.05) < 0.003
    big, _ = parse_degradation("noise:std=2")(x, torch.arange(2))
    assert 0 <= big.min() and big.max() <= 1 and ((big == 0) | (big == 1)).float().mean() > 0.5


@pytest.mark.parametrize("channels", [1, 3])
def test_gray_is_the_itu_r_601_luma(channels):
    x = torch.rand(3, channels, 16, 16, generator=torch.Generator().manual_seed(2))
    z, box = parse_degradation("gray")(x, torch.arange(3))
    assert box is None and z.shape == x.shape
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2] if channels == 3 else x[:, 0]
    for c in range(channels):
        assert_close(z[:, c], luma, atol=1e-6, rtol=0)


def test_none_is_the_identity():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    z, box = parse_degradation("none")(x, torch.arange(2), seed=4, epoch=1)
    assert box is None and torch.equal(z, x)


def test_composition_applies_left_to_right():
    x = smooth(2, 3)
    blur, jpeg = parse_degradation("blur:sigma=1.5"), parse_degradation("jpeg:quality=10")
    z, _ = parse_degradation("blur:sigma=1.5+jpeg:quality=10")(x, torch.arange(2))
    assert_close(z, jpeg(blur(x, torch.arange(2))[0], torch.arange(2))[0], atol=1e-6, rtol=0)
    other_order = blur(jpeg(x, torch.arange(2))[0], torch.arange(2))[0]
    assert (z - other_order).abs().max() > 1e-3


def test_clutter_then_lowres_keeps_the_box_and_is_low_res():
    d = make("clutter+lowres:size=8")
    x = smooth(3, 3)
    z, box = d(x, torch.arange(3))
    clutter_only, _ = make("clutter")(x, torch.arange(3))
    assert box is not None and box.shape == (3, 4)
    assert high_frequency_energy(z, 4) < high_frequency_energy(clutter_only, 4) / 20
    assert d.spec() == "clutter+lowres"


# --- spec errors --------------------------------------------------------------------------------


def test_unknown_name_suggests_a_close_one():
    with pytest.raises(CQDError, match="'lowrs'.*Did you mean 'lowres'"):
        parse_degradation("lowrs")


@pytest.mark.parametrize(
    "spec, words",
    [
        ("lowres:sz=3", ["'sz'", "size"]),
        ("lowres:size=abc", ["size", "'abc'", "int"]),
        ("blur:sigma=x1", ["sigma", "float"]),
        ("lowres:size", ["'size'", "key=value"]),
        ("+lowres", ["'+lowres'"]),
        ("lowres++blur", ["'lowres++blur'"]),
        ("lowres+", ["'lowres+'"]),
        ("", ["non-empty"]),
        ("Low Res", ["'Low Res'"]),
        ("lowres:size=1,size=2", ["'size'", "twice"]),
        ("lowres:size=0", ["size"]),
        ("blur:sigma=-1", ["sigma"]),
        ("noise:std=-1", ["std"]),
        ("jpeg:quality=0", ["quality"]),
        ("jpeg:quality=101", ["quality"]),
        ("tps:grid=1", ["grid"]),
        ("tps:sigma=-1", ["sigma"]),
        ("edges:low=0.3,high=0.2", ["low"]),
        ("edges:sigma=0", ["sigma"]),
        ("clutter:min_scale=0.7,max_scale=0.6", ["min_scale"]),
        ("clutter:pieces=0", ["pieces"]),
        ("edges:model=/nonexistent/dir/model.yml.gz", ["/nonexistent/dir/model.yml.gz", "does not exist"]),
    ],
)
def test_spec_errors_name_the_problem(spec, words):
    with pytest.raises(CQDError) as info:
        parse_degradation(spec)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("spec", ["lowres:", "lowres: ", "lowres:,"])
def test_colon_with_nothing_after_it_is_malformed(spec):
    with pytest.raises(CQDError, match="nothing after ':'|malformed parameter"):
        parse_degradation(spec)


@pytest.mark.parametrize("spec, size", [("lowres:size=64", 32), ("clutter:canvas=16", 32)])
def test_check_rejects_images_that_do_not_fit(spec, size):
    with pytest.raises(CQDError, match=str(size)):
        parse_degradation(spec).check(1, size)


NAME = st.sampled_from(NAMES + ["lowrs", "Blur", ""])
KEY = st.sampled_from(sorted({f for n in NAMES for f in DEGRADATIONS.get(n).__dataclass_fields__} | {"zz", ""}))
VALUE = st.one_of(
    st.sampled_from(["0", "1", "-1", "2.5", "1e9", "nan", "inf", "-inf", "abc", "", "none", "/", ".", "1_0"]),
    st.text("0123456789.-eE", max_size=6),
)
PARAM = st.builds(lambda k, eq, v: k + eq + v, KEY, st.sampled_from(["=", "", "=="]), VALUE)
STAGE = st.builds(lambda n, sep, ps: n + sep + ",".join(ps), NAME, st.sampled_from(["", ":", ": "]),
                  st.lists(PARAM, max_size=3))
SPEC = st.one_of(
    st.text("abcdeglnoprstuwxyz0123456789:=,+.-_ /", max_size=40),
    st.lists(STAGE, min_size=1, max_size=3).map("+".join),
)


def examples(n: int) -> int:
    """n under the default `ci` hypothesis profile, 10x under `explore` (see conftest.py)."""
    return max(1, n * settings.default.max_examples // 100)


@settings(max_examples=examples(200), deadline=None)
@given(SPEC)
def test_parser_raises_only_cqd_errors(spec):
    try:
        d = parse_degradation(spec)
        d.check(1, 32)
    except CQDError:
        return
    assert isinstance(d, Degradation)
