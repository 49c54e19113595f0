"""The super-resolution task `sr`: patches for training, PSNR/SSIM on whole images for evaluation.

What the engine asks of a task (see `cqd.engine.tasks`), for image-to-image training: the datasets
(`cqd.tasks.sr.data.SRImages`), a pair maker that cuts random aligned (LR, HR) patches on the device, and
the metrics. A pair is (x = HR patch, z = LR patch, y = HR patch: the target), all RGB in [0, 1]; the
teacher sees z too (SR distillation compresses a network, both sides get the same input).

Metrics follow the usual SR protocol: the output is clamped to [0, 1] and rounded to 8 bits (as a
saved PNG would be), both images go to BT.601 luma Y = 16 + (65.481 R + 128.553 G + 24.966 B) on
[0, 1] RGB (so Y lies in [16, 235]), `scale` border pixels are shaved, and PSNR (data range 255) and
SSIM (Gaussian window 11, sigma 1.5, K = 0.01, 0.03, over the window's valid positions: Wang et al.'s)
come from kornia, per image, then averaged over the images. PSNR is 10 log10(255^2 / MSE) per image and is
not capped: identical images give inf, and so does a mean over images that holds one. (Not torchmetrics:
once it is installed, lightning_fabric imports it in every process, about 2 s of start-up; kornia's SSIM
agrees with torchmetrics' to 1e-4.)
"""
from __future__ import annotations

import torch
from torch import Tensor

from cqd.data.paired import Pair
from cqd.degradations.base import Draws
from cqd.errors import ConfigError
from cqd.tasks.sr.data import SRImages

Y_WEIGHTS = (65.481, 128.553, 24.966)  # BT.601 for RGB in [0, 1], Y in [16, 235]
METRICS = ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic")


def y_channel(img: Tensor) -> Tensor:
    """BT.601 luma of RGB in [0, 1] (..., 3, H, W) -> (..., 1, H, W) in [16, 235], float64."""
    w = torch.tensor(Y_WEIGHTS, dtype=torch.float64, device=img.device).view(3, 1, 1)
    return 16.0 + (img.double() * w).sum(-3, keepdim=True)


def quantize(img: Tensor) -> Tensor:
    """Clamped to [0, 1] and rounded to 8-bit levels, as an output saved as PNG."""
    return img.clamp(0, 1).mul(255).round().div(255)


def psnr(a: Tensor, b: Tensor, data_range: float = 255.0) -> Tensor:
    """PSNR per image of (N, C, H, W) tensors: 10 log10(data_range^2 / MSE); inf for identical images."""
    mse = (a.double() - b.double()).pow(2).mean((1, 2, 3))
    return 10 * torch.log10(data_range**2 / mse)


def ssim(a: Tensor, b: Tensor, data_range: float = 255.0) -> Tensor:
    """SSIM per image of (N, 1, H, W) tensors (kornia; Gaussian window 11, sigma 1.5, the valid positions), in
    float32 (4x faster than float64 on a CPU)."""
    import kornia

    return kornia.metrics.ssim(a.float(), b.float(), 11, max_val=data_range, padding="valid").mean((1, 2, 3)).double()


def sr_metrics(pred: Tensor, target: Tensor, shave: int) -> tuple[Tensor, Tensor]:
    """(PSNR-Y, SSIM-Y) per image of RGB (N, 3, H, W) in [0, 1]; `pred` quantized to 8 bits, `shave` px cut."""
    yp, yt = y_channel(quantize(pred)), y_channel(target)
    if shave:
        yp, yt = yp[..., shave:-shave, shave:-shave], yt[..., shave:-shave, shave:-shave]
    return psnr(yp, yt), ssim(yp, yt)


class PatchMaker:
    """Cuts the training pairs on the device: per item an image (slot mod N), an LR patch of `sr.patch`
    px at a random position and the aligned HR patch (x scale), both under the same random flip/90-degree
    rotation (one of the 8 symmetries of the square), stacked and made float once per batch. The draws are a
    counter-based hash of (data.seed, item, epoch), so a resumed or re-batched run cuts the same patches.
    The images go to the device once, on first use; a test set's maker serves whole images instead."""

    teacher_input_fixed = False  # new patches every step: the teacher runs on each batch

    def __init__(self, cfg, base: SRImages):
        self.base, self.seed = base, cfg.data.seed
        self.patch, self.scale, self.augment = cfg.sr.patch, cfg.sr.scale, cfg.sr.augment
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self._on: tuple[object, list[Tensor], list[Tensor]] | None = None

    def view_key(self) -> str:
        return f"sr-x{self.scale}-p{self.patch}"

    def _images(self, device) -> tuple[list[Tensor], list[Tensor]]:
        device = torch.device(device)
        if self._on is None or self._on[0] != device:
            self._on = (device, [t.to(device) for t in self.base.lr], [t.to(device) for t in self.base.hr])
        return self._on[1], self._on[2]

    @torch.no_grad()
    def __call__(self, batch: dict, device, epoch: int = 0) -> Pair:
        index = batch["index"].cpu()
        draws = Draws(self.seed, index, epoch, stream=7).uniform(3).tolist()
        lrs, hrs = self._images(device)
        p, s = self.patch, self.scale
        zs, xs = [], []
        for img, (u, v, w) in zip(self.base.image_of(index).tolist(), draws):
            lr = lrs[img]
            top, left = int(u * (lr.shape[1] - p + 1)), int(v * (lr.shape[2] - p + 1))
            k = min(int(w * 8), 7) if self.augment else 0
            zs.append(symmetry(lr[:, top:top + p, left:left + p], k))
            xs.append(symmetry(hrs[img][:, top * s:(top + p) * s, left * s:(left + p) * s], k))
        z, x = torch.stack(zs).float().div_(255), torch.stack(xs).float().div_(255)
        z, x = z.contiguous(memory_format=self.memory_format), x.contiguous(memory_format=self.memory_format)
        idx = index.to(device)
        return Pair(x, z, x, torch.zeros(len(idx), 4, device=device), idx)

    def whole(self, i: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """Test image i: (LR input (1, 3, h, w) float, HR (1, 3, H, W) float, bicubic upsampling (1, 3, H, W) float)."""
        b = self.base
        f = lambda t: t[None].to(device).float().div_(255)  # noqa: E731
        return f(b.lr[i]).contiguous(memory_format=self.memory_format), f(b.hr[i]), f(b.bicubic[i])


def symmetry(img: Tensor, k: int) -> Tensor:
    """The k-th (0..7) symmetry of a square (C, S, S) patch: bit 0 flips left-right, bit 1 up-down, bit 2
    transposes (a view; the flips copy the small uint8 patch once, before the batch is stacked)."""
    dims = [d for bit, d in ((1, -1), (2, -2)) if k & bit]
    img = img.flip(dims) if dims else img
    return img.transpose(-1, -2) if k & 4 else img


@torch.no_grad()
def evaluate(models: dict, views, loader, maker: PatchMaker, fabric) -> dict[str, float]:
    """{prefix + 'psnr'/'ssim'} of each network on the whole test images (mean over images), and
    'psnr_bicubic'/'ssim_bicubic' of the bicubic upsampling (`sr.resize`'s). Each rank sums its images' values and one
    all-reduce adds them up. Models run in float32: bf16 output would cost PSNR at 8-bit precision."""
    # Fabric's wrapper (and DDP's) runs forward under the precision's autocast: run the wrapped module itself
    models = {k: getattr(m, "module", m) for k, m in models.items()}
    modes = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    # every key from the start: a rank without a test image (fewer images than ranks) all-reduces the same zeros
    keys = ["psnr_bicubic", "ssim_bicubic", *(f"{p}{'/' if p else ''}{m}" for p in models for m in ("psnr", "ssim"))]
    sums: dict[str, Tensor] = {k: torch.zeros((), dtype=torch.float64, device=fabric.device) for k in keys}

    def add(key: str, value: Tensor) -> None:
        sums[key] = sums[key] + value.sum().to(fabric.device)

    n = 0
    for batch in loader:
        for i in batch["index"].tolist():
            lr, hr, bic = maker.whole(i, fabric.device)
            p, s = sr_metrics(bic, hr, maker.scale)
            add("psnr_bicubic", p)
            add("ssim_bicubic", s)
            for prefix, model in models.items():
                out = model(lr).float()
                if out.shape != hr.shape:
                    raise ConfigError(f"the model gives {tuple(out.shape)} for a {tuple(lr.shape)} input, "
                                      f"but the HR image is {tuple(hr.shape)}: is it built for sr.scale={maker.scale}?")
                p, s = sr_metrics(out, hr, maker.scale)
                add(f"{prefix}{'/' if prefix else ''}psnr", p)
                add(f"{prefix}{'/' if prefix else ''}ssim", s)
            n += 1
    for k, m in models.items():
        m.train(modes[k])
    keys = list(sums)
    total = fabric.all_reduce(torch.stack([*(sums[k] for k in keys), torch.tensor(float(n), dtype=torch.float64,
                                                                               device=fabric.device)]), reduce_op="sum")
    count = max(float(total[-1]), 1.0)
    return {k: float(v) / count for k, v in zip(keys, total[:-1])}


def build_datasets(cfg):
    """(train, test, train, test): the patch slots of sr.train's images and the whole images of sr.test."""
    d = cfg.data
    for key, value, instead in (("val_fraction", d.val_fraction,
                                 "hold images out of sr.train and tune on them as sr.test in a run of their own"),
                                ("train_subset", d.train_subset, "list the images in sr.train"),
                                ("test_subset", d.test_subset, "list the images in sr.test")):
        if value:
            raise ConfigError(f"data.{key}={value} has no meaning for task sr (its items are images, not a "
                              f"classification split): {instead}")
    train, test = SRImages(cfg.sr, "train", cfg.data.root), SRImages(cfg.sr, "test", cfg.data.root)
    return train, test, train, test


def make_maker(cfg, base, *views) -> PatchMaker:
    return PatchMaker(cfg, base)


def model_name(cfg, name: str) -> str:
    """The model spec with `scale` from `sr.scale` (`edsr:blocks=4,feats=16` -> `...,scale=4`), so the
    saved model rebuilds at its scale; a spec that names another scale is an error."""
    from cqd.models.factory import builtin_spec

    source = name.partition(":")[0]
    try:
        builder, kwargs = builtin_spec(name)
    except Exception:
        builder, kwargs = None, {}
    import inspect

    if builder is None or "scale" not in inspect.signature(builder).parameters:
        raise ConfigError(f"task sr needs an image-to-image model with a scale, e.g. 'edsr:blocks=4,feats=16'; "
                          f"got model {name!r}")
    if "scale" in kwargs:
        if kwargs["scale"] != cfg.sr.scale:
            raise ConfigError(f"model {name!r} is built for scale {kwargs['scale']} but sr.scale is {cfg.sr.scale}; "
                              f"drop scale= from the model (task sr sets it) or change sr.scale")
        return name
    return f"{name}{',' if ':' in name else ':'}scale={cfg.sr.scale}" if source else name


def teacher_run(cfg, tcfg) -> None:
    """The teacher's own run trains `sr.teacher_epochs` epochs (default: the run's)."""
    if cfg.sr.teacher_epochs is not None:
        tcfg.train.epochs = cfg.sr.teacher_epochs
