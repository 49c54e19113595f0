"""Atomic writes and safe loads: a crash at any moment leaves the previous file intact.

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
import math
import os
import pickle
import re
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

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


def _atomic(path: Path, write: Callable[[Any], None]) -> None:
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
    _atomic(Path(path), lambda f: torch.save(obj, f))


def save_json(obj: Any, path: str | Path) -> None:
    _atomic(Path(path), lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def save_text(text: str, path: str | Path) -> None:
    _atomic(Path(path), lambda f: f.write(text.encode()))


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


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def load_model_file(path: str | Path) -> dict:
    """A `model.pt` (or `last.ckpt`) written by `cqd train`, with its fields checked."""
    ck = load_checkpoint(path)
    if not isinstance(ck.get("model"), Mapping) or not isinstance(ck.get("model_name"), str):
        raise CheckpointError(f"{path} is not a cqd model file (expected the model.pt written at the end of "
                              "`cqd train`; a bare state_dict goes in `pretrained: <path>` instead)")
    bad = [k for k in ("num_classes", "in_chans") if not _positive_int(ck.get(k))]
    if bad:
        raise CheckpointError(f"{path} is not a complete cqd model file: {', '.join(bad)} missing or invalid "
                              f"({', '.join(f'{k}={ck.get(k)!r}' for k in bad)})")
    return ck


def _mismatch(e: Exception) -> str:
    """load_state_dict's many-line complaint, counted: '2 missing keys (a, b), 1 size mismatch (c: ...)'."""
    text = str(e)
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        m = re.search(pattern, text)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {label} key(s) ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
                       r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", text)
    if sizes:
        shown = ", ".join(f"{k}: file {a} vs model {b}" for k, a, b in sizes[:3])
        parts.append(f"{len(sizes)} shape mismatch(es) ({shown}{', ...' if len(sizes) > 3 else ''})")
    if parts:
        return "; ".join(parts)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def load_state(target, state, path: str | Path, what: str) -> None:
    """`target.load_state_dict(state)`, any mismatch a CheckpointError naming `path` and `what`."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot load its {what}: {_mismatch(e)}. Was it saved from another "
                              "architecture or dataset?") from None


# settings that may change between a run and its resumption; any other difference is an error
RESUMABLE_CHANGES = ("name", "out_dir", "cache_dir", "pretrained", "teacher.pretrained", "teacher.checkpoint",
                     "data.root", "data.num_workers", "train.epochs", "train.eval_every", "train.progress",
                     "train.accelerator", "train.devices", "train.num_nodes", "train.strategy", "train.precision",
                     "train.feature_cache_mb")
FORMAT = "cqd-checkpoint-v2"


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def migrate_config(config: Mapping) -> dict:
    """A config dump of any cqd version in today's layout: the flat `method.T/lam/loss/scale` of
    files written before each method had its own section move to `method.cqd`."""
    from cqd.config import MOVED_METHOD_KEYS

    config = dict(config)
    method = dict(config.get("method") or {})
    for key, section in MOVED_METHOD_KEYS.items():
        if key in method:
            method[section] = {**method.get(section, {}), key: method.pop(key)}
    config["method"] = method
    return config


def weight_settings(config: Mapping) -> dict[str, Any]:
    """The flattened config without the sections of methods other than the chosen one (unused)."""
    config = migrate_config(config)
    chosen = config["method"].get("name")
    return {k: v for k, v in _flat(config).items()
            if not (k.startswith("method.") and k.count(".") > 1 and k.split(".")[1] != chosen)}


def load_resume_checkpoint(path: str | Path, config: Mapping) -> dict:
    """`last.ckpt` for `--resume`: complete, and written by a run with the same settings as `config`
    (except RESUMABLE_CHANGES); otherwise a CheckpointError saying what differs. A file written before
    the method API had phases (one `optimizer`, one `scheduler`, only the student) is converted."""
    ck = load_model_file(path)
    if "method" not in ck and "optimizer" in ck and "scheduler" in ck:  # the first format
        ck["method"] = {f"student.{k}": v for k, v in ck["model"].items()}
        ck["optimizers"], ck["schedulers"] = {"main": ck.pop("optimizer")}, {"main": ck.pop("scheduler")}
    missing = [k for k in ("method", "optimizers", "schedulers", "epoch", "step_in_epoch", "history") if k not in ck]
    if missing:
        raise CheckpointError(f"{path} is not a resumable checkpoint (no {', '.join(missing)}); "
                              "use another out_dir or drop --resume")
    if ck["model_name"] != config.get("model"):
        raise CheckpointError(f"{path} is for model {ck['model_name']!r}, not {config.get('model')!r}; "
                              "use another out_dir or drop --resume")
    if isinstance(ck.get("config"), Mapping):
        old, new = weight_settings(ck["config"]), weight_settings(config)
        diff = [k for k in sorted(set(old) & set(new))
                if k not in RESUMABLE_CHANGES and not _same(old.get(k), new.get(k))]
        if diff:
            shown = ", ".join(f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in diff[:4])
            more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
            raise CheckpointError(f"{path} was written with {shown}{more}; resume with the same settings, "
                                  "or use another out_dir / drop --resume to start over")
    return ck
