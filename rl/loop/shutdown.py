"""Graceful preemption: the first SIGTERM/SIGINT finishes the current step and checkpoints; a second
one exits at once (the last complete checkpoint is still there, since checkpoints are atomic)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    def __init__(self) -> None:
        self.requested: str | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            print(f"\n{name} again: exiting now; the last complete checkpoint is kept.", file=sys.stderr)
            os._exit(128 + signum)
        self.requested = name
        print(f"\n{name}: finishing this step, saving a checkpoint, then exiting "
              "(send it again to exit at once).", file=sys.stderr)


@contextmanager
def graceful_shutdown() -> Iterator[StopFlag]:
    flag = StopFlag()
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, flag._handle)
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
