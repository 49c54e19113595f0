"""Data loaders of a run: the training loader (an `EpochSampler`) and evaluation loaders (every item once)."""
from __future__ import annotations

from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate

from cqd.engine.sampling import EpochSampler


def make_loader(ds, base, batch_size: int, sampler: Sampler, num_workers: int, drop_last: bool) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                      collate_fn=getattr(base, "collate", default_collate), persistent_workers=num_workers > 0)


def eval_loader(cfg, ds, base, rank: int = 0, world: int = 1) -> DataLoader:
    """Every item of `ds` once, in order (sharded over ranks without padding), at twice the training batch."""
    sampler = EpochSampler(len(ds), 0, rank, world, shuffle=False, pad=False)
    return make_loader(ds, base, cfg.train.batch_size * 2, sampler, cfg.data.num_workers, False)
