"""The order of training items: shuffled by (seed, epoch), sharded over ranks, resumable mid-epoch."""
from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Shuffled order fixed by (seed, epoch), sharded over ranks, able to start mid-epoch (resume).

    `pad=True` (training) repeats the first items so every rank gets the same number of steps;
    `pad=False` (evaluation) gives each item to exactly one rank, so none is counted twice.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True, pad: bool = True):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world) if pad else len(range(rank, n, world))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = torch.arange(self.n)
        order = torch.cat([order, order[: max(self.per_rank * self.world - self.n, 0)]])
        return iter(order[self.rank :: self.world][self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start
