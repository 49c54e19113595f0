"""Claiming a grid cell with a lock file, so that several processes (or machines sharing the folder) split a
grid: the lock is created exclusively; one whose process is gone (same host) is taken over, and so is one left by an
earlier attempt of the same executor task (its `token`: Ray and SLURM retry a cell only once its last attempt is
dead, on whichever host)."""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state after the command's closing parenthesis
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextmanager
def claim(cell: Path, token: str | None = None):
    """Yield True if this process owns `cell` (exclusive lock file), False if another live one does.
    A lock with the same `token` (an executor's name for one task, the same in each of its attempts) is taken over.

    The lock is written whole under a temporary name and hard-linked into place (link fails if the
    lock exists), so no lock is ever seen empty or half-written by another process. A lock that cannot
    be read (left by something else, or a truncated disk write) is taken over once it is older than
    UNREADABLE_LOCK_S; one from a dead process on this host at once.
    """
    cell.mkdir(parents=True, exist_ok=True)
    lock = cell / ".lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), **({"token": token} if token else {})}
    tmp = cell / f".lock.{me['host']}.{me['pid']}.tmp"
    tmp.write_text(json.dumps(me))
    try:
        for _ in range(2):
            try:
                os.link(tmp, lock)
            except FileExistsError:
                if not _stale(lock, me["host"], token):
                    yield False
                    return
                lock.unlink(missing_ok=True)
                continue
            try:
                yield True
            finally:
                lock.unlink(missing_ok=True)
            return
        yield False
    finally:
        tmp.unlink(missing_ok=True)


UNREADABLE_LOCK_S = 60.0


def _stale(lock: Path, host: str, token: str | None = None) -> bool:
    try:
        owner = json.loads(lock.read_text())
        pid = int(owner["pid"])
    except FileNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return time.time() - lock.stat().st_mtime > UNREADABLE_LOCK_S
        except FileNotFoundError:
            return True
    if token is not None and owner.get("token") == token:  # an earlier attempt of this task, which is dead
        return True
    return owner.get("host") == host and not alive(pid)


def holder(cell: Path) -> str:
    """Who holds `cell`'s lock, for a message."""
    lock = cell / ".lock"
    try:
        owner = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        owner = {}
    return f"{lock} (host {owner.get('host', '?')}, pid {owner.get('pid', '?')})"
