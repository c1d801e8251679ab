"""The reconcile scan: what the watcher's events may have missed, found by walking every folder."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import structlog

from .config import Config
from .recorder import Recorder
from .watcher import Watcher
from .worker import Worker

log = structlog.get_logger()

# A full scan of a very large tree on a slow network share; a scan that takes longer is a hung mount.
SCAN_SECONDS = 3600.0


class Scanner(Worker):
    """The reconcile scan: at start-up, every rescan_seconds, and at once for any directory that needs it."""

    name = "scanner"

    def __init__(self, *, stop: threading.Event, config: Config, recorder: Recorder, watcher: Watcher | None) -> None:
        super().__init__(stop)
        self.config = config
        self.recorder = recorder
        self.watcher = watcher
        self.requests: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self.first_scan_done = threading.Event()
        # When the next full rescan is due, as a wall-clock time for `status`.
        self.next_full_scan = time.time()

    @property
    def quiet_seconds(self) -> float:
        """A whole rescan interval asleep on its queue, then a whole scan."""
        return self.config.watch.rescan_seconds + SCAN_SECONDS

    def request(self, path: Path | None = None) -> None:
        """Rescan a directory (None: every folder) soon; safe to call from an event handler."""
        self.requests.put(path)

    def scan_all(self) -> None:
        self.next_full_scan = time.time() + self.config.watch.rescan_seconds
        if self.watcher is not None:
            self.watcher.refresh()
        for folder in self.config.folders:
            if self.stop.is_set():
                return
            started = time.monotonic()
            changed = self.recorder.scan(folder)
            log.info(
                "scanned",
                path=str(folder.path),
                new_or_changed=changed,
                seconds=round(time.monotonic() - started, 3),
            )

    def initialize(self) -> None:
        self.scan_all()
        self.first_scan_done.set()

    def loop(self) -> None:
        try:
            target = self.requests.get(timeout=self.config.watch.rescan_seconds)
        except queue.Empty:
            target = None
        if self.stop.is_set():
            return
        if target is None:
            self.scan_all()
            return
        folder = self.config.folder_for(target / "x")
        if folder is not None:
            self.recorder.scan(folder, target if target != folder.path else None)
