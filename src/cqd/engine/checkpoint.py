"""Atomic writes and safe loads: a crash at any moment leaves the previous file intact.

Files are written to a temporary name in the same folder, fsynced, then renamed over the target
(rename is atomic on POSIX). Checkpoints load with `torch.load(weights_only=True)`, so a crafted
pickle cannot run code.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from cqd.errors import CheckpointError, CQDError


def _atomic(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CQDError(f"no space left on the device while writing {path}; the previous version is kept. Free some space and resume.") from None
        raise CQDError(f"could not write {path}: {e.strerror or e}; the previous version is kept") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(obj: dict, path: str | Path) -> None:
    _atomic(Path(path), lambda f: torch.save(obj, f))


def save_json(obj: Any, path: str | Path) -> None:
    _atomic(Path(path), lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def save_text(text: str, path: str | Path) -> None:
    _atomic(Path(path), lambda f: f.write(text.encode()))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint safely (weights_only); every failure is a CheckpointError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {p} contains objects that are not plain tensors/containers and was refused "
            f"(loaded with weights_only=True so it cannot run code): {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {p} is truncated or corrupt: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {p} holds a {type(obj).__name__}, expected a dict")
    return obj
