"""PairMaker's fixed twins: made once in index order, then looked up, equal to making them per step."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cqd.data.paired import PairMaker
from cqd.errors import CQDError

N, S = 40, 24


def batches(indices, size=8, seed=0):
    """Decoded batches as the datasets give them: uint8 images, labels, boxes and dataset indices."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N, 1, S, S), dtype=torch.uint8, generator=g)
    for i in range(0, len(indices), size):
        idx = torch.tensor(indices[i:i + size])
        yield {"full": images[idx], "crop": images[idx], "label": idx % 3, "box": torch.zeros(len(idx), 4),
               "index": idx}


def maker(spec):
    m = PairMaker(spec, mean=(0.5,), std=(0.25,))
    if m.T.needs_bank:
        m.T.bind(torch.randint(0, 256, (16, 1, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)))
    return m


class Counting:
    """Wraps a degradation and counts its calls."""

    def __init__(self, T):
        self.T, self.calls = T, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.T(*args, **kwargs)


@pytest.mark.parametrize("spec", ["clutter:canvas=48+lowres:size=8", "edges", "tps:grid=4,sigma=8"])
def test_fixed_twins_equal_per_step_twins_and_t_is_not_called_again(spec):
    on_the_fly, fixed = maker(spec), maker(spec)
    assert fixed.fix_twins(batches(list(range(0, N, 2))), "cpu", N) == N // 2  # the even items only
    fixed.T = Counting(fixed.T)
    shuffled = [int(i) * 2 for i in torch.randperm(N // 2, generator=torch.Generator().manual_seed(1))]
    for batch in batches(shuffled, size=5):
        x, z, box = fixed.views(batch, "cpu", epoch=3)
        x0, z0, box0 = on_the_fly.views(batch, "cpu", epoch=3)
        assert_close(x, x0, atol=0, rtol=0)
        assert_close(z, z0, atol=1e-5, rtol=0)
        assert_close(box, box0.expand(len(z), 4), atol=0, rtol=0)
    assert fixed.T.calls == 0


def test_an_item_without_a_fixed_twin_is_made_on_the_spot():
    fixed, on_the_fly = maker("lowres:size=6"), maker("lowres:size=6")
    fixed.fix_twins(batches([0, 1, 2]), "cpu", N)
    batch = next(batches([1, 7]))  # 7 has no fixed twin: the whole batch is made as before
    assert_close(fixed.views(batch, "cpu")[1], on_the_fly.views(batch, "cpu")[1], atol=0, rtol=0)


def test_fresh_twins_cannot_be_fixed():
    with pytest.raises(CQDError, match="fresh_each_epoch"):
        PairMaker("noise", fresh_each_epoch=True).fix_twins(batches([0]), "cpu", N)
