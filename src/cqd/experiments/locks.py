"""Claiming a grid cell with a lock file, so that several processes (or machines sharing the folder) split a
grid: the lock is created exclusively; one whose process is gone (same host) is taken over."""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def claim(cell: Path):
    """Yield True if this process owns `cell` (exclusive lock file), False if another live one does.

    The lock is written whole under a temporary name and hard-linked into place (link fails if the
    lock exists), so no lock is ever seen empty or half-written by another process. A lock that cannot
    be read (left by something else, or a truncated disk write) is taken over once it is older than
    UNREADABLE_LOCK_S; one from a dead process on this host at once.
    """
    cell.mkdir(parents=True, exist_ok=True)
    lock = cell / ".lock"
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    tmp = cell / f".lock.{me['host']}.{me['pid']}.tmp"
    tmp.write_text(json.dumps(me))
    try:
        for _ in range(2):
            try:
                os.link(tmp, lock)
            except FileExistsError:
                if not _stale(lock, me["host"]):
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


def _stale(lock: Path, host: str) -> bool:
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
    return owner.get("host") == host and not _alive(pid)


def holder(cell: Path) -> str:
    """Who holds `cell`'s lock, for a message."""
    lock = cell / ".lock"
    try:
        owner = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        owner = {}
    return f"{lock} (host {owner.get('host', '?')}, pid {owner.get('pid', '?')})"
