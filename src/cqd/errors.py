"""One exception type for every mistake a user can make, and how the CLI words any failure.

The CLI prints a `CQDError` as one paragraph (`cqd: error: ...`) and exits 2. An `OSError` (a file
or folder the OS refuses) and running out of memory are worded the same way. Anything else is a bug
in cqd: one `cqd: internal error:` line and exit 1; `cqd --debug ...` shows every traceback.
"""
from __future__ import annotations

import re


class CQDError(Exception):
    """Bad input from the user: a name, value, file or config key, and what would be right."""


class ConfigError(CQDError):
    """A config key, type or value is wrong."""


class DataError(CQDError):
    """A dataset folder, annotation file or image is missing or malformed."""


class CheckpointError(CQDError):
    """A checkpoint is missing, corrupt, or belongs to another model."""


class TrainingDiverged(CQDError):
    """A loss became NaN or infinite."""


EXIT_USER, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130


def _unwrap_worker(msg: str) -> str:
    """A DataLoader worker re-raises our error as 'Caught DataError in DataLoader worker process 0.
    Original Traceback ... cqd.errors.DataError: <message>': keep the message only."""
    if "Original Traceback" not in msg:
        return msg
    found = list(re.finditer(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Diverged|Exception): ", msg, re.M))
    return msg[found[-1].end():] if found else msg


def _paragraph(msg: str) -> str:
    """One paragraph: no blank lines, no trailing space."""
    return re.sub(r"\n\s*\n+", "\n", msg.strip())


def _out_of_memory(e: BaseException) -> bool:
    """torch's CPU allocator reports a failed allocation as a plain RuntimeError ("DefaultCPUAllocator:
    can't allocate memory" / "not enough memory"), not as torch.OutOfMemoryError as CUDA does."""
    return isinstance(e, RuntimeError) and bool(
        re.search(r"can't allocate memory|not enough memory|out of memory", str(e), re.IGNORECASE))


def describe(e: BaseException) -> tuple[str, int]:
    """(what `cqd` prints on stderr, exit code) for an exception that ended a command."""
    if isinstance(e, KeyboardInterrupt):
        return "cqd: interrupted", EXIT_INTERRUPTED
    if isinstance(e, CQDError):
        return f"cqd: error: {_paragraph(_unwrap_worker(str(e)))}", EXIT_USER
    if isinstance(e, OSError):
        what = e.strerror or str(e) or type(e).__name__
        names = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"cqd: error: {names + ': ' if names else ''}{what} (check the path and its permissions)", EXIT_USER
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or _out_of_memory(e):
        return ("cqd: error: out of memory; lower train.batch_size, data.image_size or data.num_workers "
                "(or use a bigger device)"), EXIT_USER
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return (f"cqd: internal error: {type(e).__name__}: {first}\nThis is a bug in cqd, not in your input; "
            "run the same command with --debug for the traceback and report it."), EXIT_BUG
