"""Teacher soft targets f(x), computed once per (teacher weights, data, view, precision) and reused.

The original code precomputed the teacher's outputs; this does the same whenever x is fixed
(no fresh per-epoch draws on the teacher's view). The key hashes the teacher's weights, the
dataset identity (with the run's precision: f(x) is computed under its autocast) and the view,
so a changed teacher, dataset, precision or teacher-view degradation misses.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from cqd.errors import CheckpointError
from cqd.files import load_checkpoint, save_checkpoint


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(teacher: nn.Module, data_identity: dict, view_key: str) -> str:
    blob = json.dumps({"w": weights_digest(teacher), "data": data_identity, "view": view_key}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_teacher_logits(cache_dir: str | Path, key: str, compute, extra: dict | None = None) -> tuple[Tensor, bool]:
    """(table, hit). Loads `cache_dir/teacher-<key>.pt` or computes and writes it atomically (with `extra`, e.g. the
    temperature the logits were divided by)."""
    path = Path(cache_dir) / f"teacher-{key}.pt"
    if path.is_file():
        try:
            table = load_checkpoint(path)["logits"]
            if not isinstance(table, Tensor):
                raise TypeError(f"'logits' is a {type(table).__name__}, not a tensor")
            return table, True
        except (CheckpointError, KeyError, TypeError) as e:
            warnings.warn(f"{path}: unreadable teacher cache ({type(e).__name__}: {e}); computing it again",
                          stacklevel=2)
            path.unlink(missing_ok=True)
    table = compute()
    save_checkpoint({"logits": table.cpu(), **(extra or {})}, path)
    return table, False
