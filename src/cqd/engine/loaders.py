"""Datasets, data loaders and pair makers of a run config (the data half of config -> engine)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler, Subset
from torch.utils.data._utils.collate import default_collate

from cqd.data import DATASETS
from cqd.data.paired import PairMaker
from cqd.engine.sampling import EpochSampler


def build_datasets(cfg):
    """(train, test, base_train, base_test): subsets are a fixed shuffle (seed 0) so every run sees the same items."""
    d = cfg.data
    builder = DATASETS.get(d.name)
    out = []
    for split, n in (("train", d.train_subset), ("test", d.test_subset)):
        ds = builder(d.root, split, d.image_size, on_corrupt=d.on_corrupt)
        sub = ds if n is None or n >= len(ds) else Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist())
        out.append((sub, ds))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def make_loader(ds, base, batch_size: int, sampler: Sampler, num_workers: int, drop_last: bool) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                      collate_fn=getattr(base, "collate", default_collate), persistent_workers=num_workers > 0)


def eval_loader(cfg, ds, base, rank: int = 0, world: int = 1) -> DataLoader:
    """Every item of `ds` once, in order (sharded over ranks without padding), at twice the training batch."""
    sampler = EpochSampler(len(ds), 0, rank, world, shuffle=False, pad=False)
    return make_loader(ds, base, cfg.train.batch_size * 2, sampler, cfg.data.num_workers, False)


def make_maker(cfg, base, hq_view: str | None = None, hq_degradation: str | None = None) -> PairMaker:
    """The run's PairMaker; with `hq_view`/`hq_degradation`, one that makes a teacher's own x."""
    maker = PairMaker(cfg.data.degradation, hq_view or cfg.data.hq_view, cfg.data.lq_view,
                      hq_degradation or cfg.data.hq_degradation, seed=cfg.data.seed,
                      fresh_each_epoch=cfg.data.fresh_each_epoch,
                      mean=getattr(base, "mean", (0.485, 0.456, 0.406)), std=getattr(base, "std", (0.229, 0.224, 0.225)),
                      channels_last=cfg.train.channels_last)
    maker.prepare(base)
    return maker
