"""A task from outside the package, as a user would write one (docs/write-a-task.md walks through it).

Task `regress`: predict the mean brightness y of a clean image x from its noisy twin z = x + noise. It brings
its own datasets (synthetic, made from a seed), pair maker, metric (mean absolute error on each view), config
section (`regress:`), two methods (`regress` trains g on z, `regress_hq` trains on x: the task's teacher
method) and its grid report. A config loads it with `plugins: [plugin_regress]`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.data import Dataset

from cqd.data.paired import Pair
from cqd.files import save_text
from cqd.methods import METHODS, Method
from cqd.schema import Strict
from cqd.tasks import TASKS, Task


class RegressConfig(Strict):
    """The task's own section, `regress:`."""

    items: int = Field(96, ge=8, description="training items (the test set has half as many)")
    noise: float = Field(0.3, ge=0, description="std of the noise added to x to make z")


class Smooth(Dataset):
    """Smooth random 1-channel images, a fixed function of (seed, index)."""

    num_classes, in_chans = 1, 1

    def __init__(self, n: int, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(n, 1, 4, 4, generator=g)
        self.images = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "index": torch.tensor(i)}


class NoisyMaker:
    """Batch -> Pair(x, z = x + noise (seeded by item), y = mean of x)."""

    def __init__(self, noise: float, seed: int):
        self.noise, self.seed = noise, seed

    def __call__(self, batch: dict, device, epoch: int = 0) -> Pair:
        x, index = batch["image"].to(device), batch["index"].to(device)
        seeds = [self.seed * 100003 + int(i) for i in batch["index"]]
        noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        noise = noise.to(device)
        return Pair(x, x + self.noise * noise, x.mean((1, 2, 3)), torch.zeros(len(x), 4, device=device), index)


@TASKS.register("regress")
class Regress(Task):
    name = "regress"
    Config = RegressConfig
    teacher_method = "regress_hq"
    metrics = ("mae_hq", "mae_lq")
    eval_keys = ("mae_hq", "mae_lq")
    fixes_twins = False
    report = __name__

    def build_datasets(self, cfg):
        train = Smooth(cfg.regress.items, cfg.data.image_size, seed=1)
        test = Smooth(cfg.regress.items // 2, cfg.data.image_size, seed=2)
        return train, test, train, test

    def make_maker(self, cfg, base, hq_view=None, hq_degradation=None):
        return NoisyMaker(cfg.regress.noise, cfg.data.seed)

    @torch.no_grad()
    def evaluate(self, models, views, loader, maker, fabric):
        sums: dict[str, torch.Tensor] = {}
        modes = {k: m.training for k, m in models.items()}
        for m in models.values():
            m.eval()
        for batch in loader:
            pair = maker(batch, fabric.device)
            for view, (inputs, y) in views(pair).items():
                for prefix, model in models.items():
                    key = f"{prefix}{'/' if prefix else ''}mae_{view}"
                    err = (model(inputs).float().squeeze(1) - y).abs()
                    s = sums.setdefault(key, torch.zeros(2, dtype=torch.float64, device=fabric.device))
                    s += torch.stack([err.sum().double(), torch.tensor(float(len(err)), device=fabric.device)])
        for k, m in models.items():
            m.train(modes[k])
        total = fabric.all_reduce(torch.stack(list(sums.values())), reduce_op="sum").tolist()
        return {k: err / n for k, (err, n) in zip(sums, total)}


@METHODS.register("regress")
class RegressOnZ(Method):
    label = "g on z (MSE)"

    def forward(self, step):
        out = self.student(step.pair.z).float().squeeze(1)
        return out, {"loss_mse": F.mse_loss(out, step.pair.y)}


@METHODS.register("regress_hq")
class RegressOnX(Method):
    label = "f on x (MSE)"
    uses_z = False

    def forward(self, step):
        out = self.student(step.pair.x).float().squeeze(1)
        return out, {"loss_mse": F.mse_loss(out, step.pair.y)}


def write_report(cells, grid, out: Path) -> tuple[str, dict]:
    """The grid's table: MAE on z of each row, per column, over the seeds (mean)."""
    table: dict[str, dict[str, float]] = {}
    for cell, res in cells:
        if cell.row is not None and res is not None:
            table.setdefault(cell.row, {}).setdefault(cell.column, []).append(res["mae_lq"])
    cols = list(grid.columns)
    md = "| row | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    for row, by_col in table.items():
        md += f"| {row} | " + " | ".join(f"{sum(v) / len(v):.4f}" for v in (by_col[c] for c in cols)) + " |\n"
    save_text(md, Path(out) / "table.md")
    return md, table
