"""Ctrl-C and SIGTERM stop a run at the next step boundary, so the saved checkpoint is consistent."""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

import torch


class StopRequest:
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM asks the loop to stop at the next step boundary.

    A KeyboardInterrupt raised by the default handler can land between `opt.step()` and the step
    counter, and the checkpoint then holds weights one step ahead of its `step_in_epoch` (a resumed
    run repeats that batch). Deferring to `check()` keeps the saved state consistent; a second
    signal stops at once.

    Under DDP every rank must stop at the same step: a rank that stopped alone would leave the others
    waiting forever in the next step's gradient all-reduce (a signal reaches the ranks at different
    points of their steps, or reaches one rank only). So `check(fabric, due)` sums the ranks' requests with
    one scalar all-reduce at the steps where `due` (every `train.check_every`, the same steps on every rank):
    a device sync on GPU, so not every step. A single process reads its own flag at every step (no sync).
    """

    def __init__(self):
        self.requested = False

    def handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("cqd: stopping after this step (signal again to stop now)", file=sys.stderr, flush=True)

    def check(self, fabric=None, due: bool = True) -> None:
        requested = self.requested
        if fabric is not None and fabric.world_size > 1:
            if not due:
                return
            flag = torch.tensor(float(requested), device=fabric.device)
            requested = bool(fabric.all_reduce(flag, reduce_op="sum") > 0)
        if requested:
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
