"""Numbers checked against values computed independently: top-1 of a model whose predictions are known,
the table's mean, spread and "gap closed" by hand; and the grid's lock files."""
from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from cqd.data.fashion_mnist import FashionMNIST
from cqd.data.paired import PairMaker
from cqd.engine.precision import make_fabric
from cqd.engine.schema import run_config
from cqd.experiments.grid import Cell, run_cell
from cqd.experiments.locks import UNREADABLE_LOCK_S, claim
from cqd.experiments.schema import GridConfig, grid_config
from cqd.methods import METHODS
from cqd.tasks.classification import metrics as classification
from cqd.tasks.classification.report import GAP, summarize


class SharpOrBlurred(nn.Module):
    """Says 3 for a sharp image (a checkerboard: large spread of pixel values) and 5 for a blurred one."""

    def forward(self, img):
        sharp = img.flatten(1).std(1) > 0.5
        out = torch.full((len(img), 10), -1.0)
        out[sharp, 3] = 1.0
        out[~sharp, 5] = 1.0
        return out


def test_top1_on_each_view_is_the_share_of_its_known_predictions():
    n, size = 96, 16
    board = ((torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2 * 255).to(torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    ds = FashionMNIST(board.expand(n, size, size).clone(), labels, size)
    maker = PairMaker("blur:sigma=3", mean=(0.5,), std=(0.5,))
    maker.prepare(ds)
    loader = DataLoader(ds, batch_size=32, collate_fn=ds.collate)
    fabric = make_fabric(run_config({"train": {"accelerator": "cpu", "precision": "32-true"}}).train)
    acc = classification.evaluate({"": SharpOrBlurred()}, METHODS.get("lq").eval_views, loader, maker, fabric)
    want_hq, want_lq = int((labels == 3).sum()) / n, int((labels == 5).sum()) / n
    assert want_hq != want_lq  # the two views give different numbers, so a swap shows
    assert acc == {"acc_hq": want_hq, "acc_lq": want_lq}


def _cells(grid: GridConfig, values: dict) -> list:
    """Fake finished cells: values[(column, row, seed)] = (acc_hq, acc_lq)."""
    out = []
    for (column, row, seed), (hq, lq) in values.items():
        cfg = run_config({"seed": seed})
        out.append((Cell("eval" if row == "hq" else "train", cfg, column, row), {"acc_hq": hq, "acc_lq": lq}))
    return out


def test_table_mean_spread_and_gap_closed_equal_hand_computed_values():
    grid = grid_config({"seeds": [0, 1, 2], "rows": ["hq", "lq", "cqd"], "columns": {"c": {"degradation": "blur"}}})
    up, b, c = [0.80, 0.84, 0.82], [0.60, 0.66, 0.61], [0.70, 0.71, 0.75]
    values = {}
    for s in range(3):
        values[("c", "hq", s)] = (up[s], 0.3)
        values[("c", "lq", s)] = (0.5, b[s])
        values[("c", "cqd", s)] = (0.5, c[s])
    table = summarize(_cells(grid, values), grid)["c"]

    def mean_std(v):  # sample standard deviation (n - 1), written out
        m = sum(v) / len(v)
        return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))

    for label, v in (("A -> A upper bound", up), ("B -> B fine-tuning", b), ("CQD -> B cqd (proposed)", c)):
        m, sd = mean_std([100 * x for x in v])
        assert (math.isclose(table[label]["mean"], m, rel_tol=1e-12)
                and math.isclose(table[label]["std"], sd, rel_tol=1e-9))
        assert table[label]["n"] == 3
    assert math.isclose(table["A -> B no adaptation"]["mean"], 30.0) and table["A -> B no adaptation"]["std"] == 0
    gaps = [(c[s] - b[s]) / (up[s] - b[s]) for s in range(3)]  # per seed, then averaged
    m, sd = mean_std(gaps)
    assert math.isclose(table[GAP]["mean"], m, rel_tol=1e-9) and math.isclose(table[GAP]["std"], sd, rel_tol=1e-9)
    assert not math.isclose(m, (sum(c) - sum(b)) / (sum(up) - sum(b)), rel_tol=1e-6)  # not the gap of the means
    # one seed: no spread, and a missing cell is left out, not counted as 0
    one = summarize(_cells(grid, {k: v for k, v in values.items() if k[2] == 0 and k[1] != "cqd"}), grid)["c"]
    assert one["B -> B fine-tuning"] == {"mean": 60.0, "std": 0.0, "n": 1} and one["CQD -> B cqd (proposed)"]["n"] == 0
    assert one[GAP]["n"] == 0


# --- lock files ----------------------------------------------------------------------------------

def test_a_cells_lock_is_removed_after_the_cell(tmp_path, tiny_config):
    cfg = run_config(tiny_config(method__name="lq", train__epochs=1, train__max_steps_per_epoch=1))
    assert run_cell("train", cfg) is not None
    assert not (Path(cfg.out_dir) / ".lock").exists()
    assert not list(Path(cfg.out_dir).glob(".lock*"))  # nor its temporary twin


def test_an_empty_or_half_written_lock_does_not_block_the_grid_forever(tmp_path):
    cell = tmp_path / "cell"
    cell.mkdir()
    lock = cell / ".lock"
    for text in ("", '{"host": "' + socket.gethostname() + '", "pi'):
        lock.write_text(text)
        with claim(cell) as mine:
            assert not mine  # fresh: maybe a writer is still writing it
        old = time.time() - UNREADABLE_LOCK_S - 5
        os.utime(lock, (old, old))
        with claim(cell) as mine:
            assert mine and json.loads(lock.read_text())["pid"] == os.getpid()  # taken over, written whole
        assert not lock.exists()


def test_a_lock_is_never_seen_half_written(tmp_path, monkeypatch):
    """The lock appears with its content (hard link of a whole file), so a reader never parses a partial one."""
    cell = tmp_path / "cell"
    seen = []
    real_link = os.link

    def link(src, dst, *a, **k):
        seen.append(json.loads(Path(src).read_text()))
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", link)
    with claim(cell) as mine:
        assert mine and seen == [{"host": socket.gethostname(), "pid": os.getpid()}]
        assert json.loads((cell / ".lock").read_text()) == seen[0]
