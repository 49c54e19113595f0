"""Files, the ground floor: atomic writes and safe loads: a crash at any moment leaves the previous file intact.

Files are written to a temporary name in the same folder, fsynced, then renamed over the target
(rename is atomic on POSIX), so a reader (or a resumed run) sees either the old or the new complete
file, even after a SIGKILL or a full disk. Temporary files of writers that died (SIGKILL, power
loss) are removed by the next write into the same folder. Checkpoints load with
`torch.load(weights_only=True)`, so a crafted pickle cannot run code; every failure is a
`CheckpointError` naming the file.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from cqd.errors import CheckpointError, CQDError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


class _Recorder:
    """A file wrapper that remembers the OSError of a failed write: torch.save turns it into a
    RuntimeError ("unexpected pos ...") that no longer says the disk is full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        try:
            return self.f.flush()
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def _oserror(e: BaseException, rec: _Recorder | None) -> OSError | None:
    """The OSError behind `e`: itself, one in its cause/context chain, or what the writer saw."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return rec.error if rec is not None else None


def _remove_stale_temps(folder: Path) -> None:
    """Delete temp files left in `folder` by writers on this host that no longer run (SIGKILL)."""
    try:
        names = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    except OSError:
        return
    for p in names:
        parts = p.name.split(".")
        if len(parts) < 5 or parts[-4] != _HOST or not parts[-3].isdigit():
            continue
        pid = int(parts[-3])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except OSError:  # alive, another user's
            pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path: Path, err: OSError | None, e: BaseException) -> CQDError:
    if err is not None and err.errno in _NO_SPACE:
        return CQDError(f"no space left on the device while writing {path}; the previous version of the file "
                        "is kept. Free some space (or set out_dir elsewhere) and resume with --resume.")
    why = (err.strerror or str(err)) if err is not None else f"{type(e).__name__}: {e}"
    return CQDError(f"could not write {path}: {why}; the previous version of the file is kept")


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CQDError(f"cannot write {path}: {e.strerror or e} ({e.filename or path.parent}); "
                       "choose a writable out_dir / cache_dir") from None
    _remove_stale_temps(path.parent)
    rec = None
    try:
        with os.fdopen(fd, "wb") as f:
            rec = _Recorder(f)
            write(rec)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        Path(tmp).unlink(missing_ok=True)
        err = _oserror(e, rec)
        if isinstance(e, RuntimeError) and err is None:
            raise
        raise _write_error(path, err, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(obj: dict, path: str | Path) -> None:
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def save_json(obj: Any, path: str | Path) -> None:
    atomic_write(Path(path), lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def save_text(text: str, path: str | Path) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def _refused(e: Exception) -> str:
    """The useful line of torch's weights_only refusal ("... unsupported GLOBAL posix.system ...")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln:
            return ln
    return lines[-1] if lines else type(e).__name__


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint safely (weights_only); every failure is a CheckpointError naming the file."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"a checkpoint path must be a file name, got {type(path).__name__} {path!r}")
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"checkpoint {p} is a folder; pass the file inside it (e.g. {p / 'model.pt'})")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal below says more
            obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {p} was refused: it holds objects that are not plain tensors and containers "
            f"({_refused(e)}). It was loaded with weights_only=True, so nothing in it ran; use a file "
            "written by cqd or a plain state_dict."
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure to parse the file means it is not a checkpoint
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]  # torch adds paragraphs of advice
        raise CheckpointError(
            f"checkpoint {p} is truncated, corrupt or not a PyTorch file ({type(e).__name__}: {first[:200]})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {p} holds a {type(obj).__name__}, expected a dict")
    return obj


def load_json(path: str | Path) -> Any:
    """A JSON file written by cqd; a truncated or corrupt one is a CheckpointError naming it."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is truncated or not valid JSON ({e}); delete it (or rerun with --force) "
                              "to make it again") from None
