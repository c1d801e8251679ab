"""The running daemon: builds every worker, starts and supervises them, and stops them warm or cold."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from .config import Config
from .ledger import Ledger
from .uploader import RATE_LIMIT_POLICY, Client, Gate, RateLimiter, RetryPolicy
from .watcher import Recorder, Watcher
from .worker import FILE_RETRY_POLICY, Scanner, Settler, UploadWorker, Worker

log = structlog.get_logger()

EXIT_PAUSED = 75
EXIT_LEDGER = 74


class Daemon:
    """Every thread of a running daemon, from start-up to a warm or cold shutdown.

    The first stop request lets uploads in flight finish for `grace_seconds`, then abandons them cleanly
    (their rows go back to the queue). A second request abandons them at once.
    """

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        client: Client,
        *,
        once: bool = False,
        grace_seconds: float = 20.0,
        policy: RetryPolicy = FILE_RETRY_POLICY,
        rate_limit_policy: RetryPolicy = RATE_LIMIT_POLICY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.client = client
        self.once = once
        self.grace_seconds = grace_seconds
        self.stop = threading.Event()
        self.abandon = threading.Event()
        self.wake = threading.Event()
        self.uploads_ready = threading.Event()
        self.gate = Gate(ledger, config.upload.account_check_seconds, rate_limit_policy, clock)
        self.recorder = Recorder(config, ledger, self.wake)
        self.watcher = None if once else Watcher(config, self.recorder, lambda path: self.scanner.request(path))
        self.scanner = Scanner(self.stop, config, self.recorder, self.watcher)
        self.settler = Settler(self.stop, config, ledger, self.wake, self.uploads_ready, clock)
        limiter = RateLimiter(config.upload.rate_per_second)
        self.uploaders = [
            UploadWorker(
                self.stop,
                n,
                config,
                ledger,
                client,
                limiter,
                self.gate,
                self.uploads_ready,
                self.abandon,
                policy,
                clock,
            )
            for n in range(1, config.upload.workers + 1)
        ]
        self.workers: list[Worker] = [self.scanner, self.settler, *self.uploaders]
        self.threads: list[threading.Thread] = []

    def request_stop(self) -> None:
        """Safe from a signal handler: the first call is a warm stop, the next abandons uploads in flight."""
        if self.stop.is_set():
            self.abandon.set()
        self.stop.set()
        self.wake.set()
        self.uploads_ready.set()
        self.scanner.request(None)

    def start(self) -> None:
        requeued = self.ledger.requeue_interrupted()
        if requeued:
            log.warning("uploads interrupted by the last shutdown go back to the queue", rows=requeued)
        if self.watcher is not None:
            self.watcher.start()
        for worker in self.workers:
            thread = threading.Thread(target=worker.run, name=worker.name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def idle(self) -> bool:
        """Nothing left to do now: the first scan is done and only future retries remain."""
        if not self.scanner.first_scan_done.is_set() or any(u.busy.is_set() for u in self.uploaders):
            return False
        return self.ledger.due_count([folder.path for folder in self.config.folders]) == 0

    def run(self) -> int:
        """Run until stopped (or, with once, until idle); returns the process exit code."""
        self.start()
        log.info("started", folders=len(self.config.folders), once=self.once, workers=len(self.uploaders))
        code = 0
        while not self.stop.wait(0.2):
            if self.watcher is not None:
                self.watcher.supervise()
            if not self.once:
                continue
            pause = self.gate.pause
            if pause is not None and pause.kind == "account":
                log.error("stopping: uploads are paused", reason=pause.reason)
                code = EXIT_PAUSED
                break
            if self.idle():
                break
        self.shutdown()
        fatal = next((worker.fatal for worker in self.workers if worker.fatal), None)
        if fatal is not None:
            log.error("stopping: the ledger cannot be written; nothing was lost", error=str(fatal))
            return EXIT_LEDGER
        return code

    def shutdown(self) -> None:
        self.request_stop()
        if self.watcher is not None:
            self.watcher.stop()
        deadline = time.monotonic() + self.grace_seconds
        for thread in self.threads:
            while thread.is_alive() and not self.abandon.is_set():
                thread.join(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                if time.monotonic() >= deadline:
                    self.abandon.set()
            thread.join(timeout=2)
        log.info("stopped")
