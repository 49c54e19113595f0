"""Ctrl-C and SIGTERM stop a run at the next step boundary, so the saved checkpoint is consistent."""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager


class StopRequest:
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM asks the loop to stop at the next step boundary.

    A KeyboardInterrupt raised by the default handler can land between `opt.step()` and the step
    counter, and the checkpoint then holds weights one step ahead of its `step_in_epoch` (a resumed
    run repeats that batch). Deferring to `check()` keeps the saved state consistent; a second
    signal stops at once.
    """

    def __init__(self):
        self.requested = False

    def handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("cqd: stopping after this step (signal again to stop now)", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


@contextmanager
def stop_on_signal():
    stop = StopRequest()
    old = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, stop.handler)
    except ValueError:  # not the main thread: signals stay as they are
        pass
    try:
        yield stop
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
