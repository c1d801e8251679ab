"""What a signal asks of a process: counters and events set without taking a lock, read by a loop."""

from __future__ import annotations

import os
import signal
import threading


class Signals:
    """What the signal handlers ask of the daemon: plain counters that a handler bumps without taking a lock.

    The daemon's main loop reads them several times a second.
    """

    def __init__(self) -> None:
        self.stops = 0
        self.reloads = 0


def stop_on_signals(*numbers: int) -> threading.Event:
    """An event that is set when one of these signals arrives, for commands that run in the foreground.

    The handlers themselves do nothing, so they take no lock: the interpreter writes each signal's number to a
    wakeup pipe, and a thread of ours reads it and sets the event.
    """
    stop = threading.Event()
    readable, writable = os.pipe()
    os.set_blocking(writable, False)
    signal.set_wakeup_fd(writable, warn_on_full_buffer=False)
    for number in numbers:
        signal.signal(number, _nothing)

    def listen() -> None:
        while os.read(readable, 64):
            stop.set()

    threading.Thread(target=listen, name="signals", daemon=True).start()
    return stop


def _nothing(signum: int, frame: object) -> None:
    """A Python handler, so that the signal reaches the wakeup pipe instead of ending the process."""
