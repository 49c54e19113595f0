"""The classification task's data: datasets of `data.name` (subsets, the validation split) and the pair maker."""
from __future__ import annotations

import warnings

import torch
from torch.utils.data import Subset

from cqd.data import DATASETS
from cqd.data.paired import PairMaker
from cqd.errors import ConfigError


def build_datasets(cfg):
    """(train, test, base_train, base_test): subsets are a fixed shuffle (seed 0) so every run sees the same
    items; with `data.val_fraction` the validation items (`split_items`) are left out of train."""
    d = cfg.data
    train_ds, test_ds = (open_split(d, split) for split in ("train", "test"))
    for key, ds, split in (("train_subset", train_ds, "train"), ("test_subset", test_ds, "test")):
        if getattr(d, key) is not None and getattr(d, key) > len(ds):
            _note_once(f"data.{key}={getattr(d, key)} is more than the {len(ds)} items of {d.name}'s {split} split: "
                       f"using all {len(ds)}")
    train_items = split_items(d, len(train_ds))[0]
    return ((train_ds if train_items is None else Subset(train_ds, train_items)), _first(test_ds, d.test_subset),
            train_ds, test_ds)


_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    """A warning shown once per process (a run builds its datasets again for its teachers and its evaluation)."""
    if message not in _NOTED:
        _NOTED.add(message)
        warnings.warn(message, stacklevel=3)


def open_split(d, split: str):
    """The dataset `d.name`'s `split` (`d` a `data:` section); paired_folder also gets its low-quality tree."""
    extra = {} if d.root_lq is None else {"root_lq": d.root_lq, "lq_only": d.test_lq_only and split == "test"}
    return DATASETS.get(d.name)(d.root, split, d.image_size, on_corrupt=d.on_corrupt, **extra)


def normalization(base) -> tuple[list[float], list[float]]:
    """(mean, std) the pair maker normalizes a dataset's images with: its own, else ImageNet's."""
    return list(getattr(base, "mean", (0.485, 0.456, 0.406))), list(getattr(base, "std", (0.229, 0.224, 0.225)))


def _first(ds, n: int | None):
    return ds if n is None or n >= len(ds) else Subset(ds, _shuffle(len(ds), 0)[:n])


def _shuffle(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def split_items(d, n: int) -> tuple[list[int] | None, list[int]]:
    """(training items, validation items) of a train split of `n` items, as its indices (training items
    None: the whole split). The items are the split or `data.train_subset` of a fixed shuffle (seed 0);
    `data.val_fraction` of them (of the first `data.val_from` of that shuffle where it is set), drawn by
    `data.seed` alone, are held out for validation."""
    items = _items(n, d.train_subset)
    if not d.val_fraction:
        return (None if len(items) == n else items), []
    pool = items if d.val_from is None else _items(n, d.val_from)
    k = round(len(pool) * d.val_fraction)
    if not 0 < k < len(pool):
        raise ConfigError(f"data.val_fraction={d.val_fraction:g} of {len(pool)} training items holds out {k}; "
                          "choose it so that both the validation and the training split keep at least one item")
    held = set(_shuffle(len(pool), d.seed)[:k])
    val = [i for j, i in enumerate(pool) if j in held]
    out = set(val)
    return [i for i in items if i not in out], val


def _items(n: int, subset: int | None) -> list[int]:
    """The first `subset` items of the train split's fixed shuffle (seed 0); all `n`, in order, for None."""
    return list(range(n)) if subset is None or subset >= n else _shuffle(n, 0)[:subset]


def val_dataset(cfg, base_train):
    """The validation items of `data.val_fraction` (None when it is 0): training items never trained on."""
    items = split_items(cfg.data, len(base_train))[1]
    return Subset(base_train, items) if items else None


def make_maker(cfg, base, hq_view: str | None = None, hq_degradation: str | None = None) -> PairMaker:
    """The run's PairMaker (a BlendMaker with `data.mix`); with `hq_view`/`hq_degradation`, one that makes a
    teacher's own x."""
    mean, std = normalization(base)
    common = {"hq_view": hq_view or cfg.data.hq_view, "lq_view": cfg.data.lq_view,
              "hq_degradation": hq_degradation or cfg.data.hq_degradation, "seed": cfg.data.seed,
              "fresh_each_epoch": cfg.data.fresh_each_epoch, "mean": mean, "std": std,
              "channels_last": cfg.train.channels_last}
    mix = getattr(cfg.data, "mix", None)
    if mix is not None:
        from cqd.data.blend import BlendMaker

        maker = BlendMaker(mix.degradations, mix.alpha, None if mix.c is None else [mix.c], **common)
    else:
        maker = PairMaker(cfg.data.degradation, **common)
    maker.prepare(base)
    maker.lq_only = getattr(base, "lq_only", False)  # a test set of low-quality images alone: no top-1 on x
    return maker
