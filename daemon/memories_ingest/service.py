"""The running daemon: builds every worker, starts and supervises them, and stops them warm or cold."""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from collections.abc import Callable

import structlog

from . import prober
from .config import Config, ConfigError
from .finisher import Finisher
from .indexer import ACCEPT_WAIT_SECONDS, MAX_PAGES, CallbackListener, Indexer
from .ledger import Ledger
from .monitor import STATUS_SECONDS, Metrics, MonitorServer, Notifier, status_line
from .uploader import RATE_LIMIT_POLICY, Client, Gate, RateLimiter, RetryPolicy
from .watcher import Recorder, Watcher
from .worker import FILE_RETRY_POLICY, Scanner, Settler, UploadWorker, Worker

log = structlog.get_logger()

EXIT_PAUSED = 75
EXIT_LEDGER = 74
# How long a worker may show no sign of life beyond the longest wait its config allows: room for a slow disk,
# a ledger busy in another process, a loaded host.
STALL_MARGIN_SECONDS = 120.0
# A full scan of a very large tree on a slow network share; a scan that takes longer is a hung mount.
SCAN_SECONDS = 3600.0
# The main loop runs five times a second; this long without it, supervision and the watchdog have stopped.
MAIN_LOOP_SECONDS = 60.0


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
        loader: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.loader = loader
        self.reload_requested = threading.Event()
        self.reloaded: Config | None = None
        self.ledger = ledger
        self.client = client
        self.once = once
        self.grace_seconds = grace_seconds
        self.stop = threading.Event()
        self.abandon = threading.Event()
        self.wake = threading.Event()
        self.uploads_ready = threading.Event()
        self.actions_ready = threading.Event()
        self.gate = Gate(ledger, config.upload.account_check_seconds, rate_limit_policy, clock)
        self.recorder = Recorder(config, ledger, self.wake)
        self.watcher = None if once else Watcher(config, self.recorder, lambda path: self.scanner.request(path))
        self.scanner = Scanner(self.stop, config, self.recorder, self.watcher)
        self.settler = Settler(
            self.stop, config, ledger, self.wake, self.uploads_ready, clock, actions_ready=self.actions_ready
        )
        limiter = RateLimiter(config.upload.rate_per_second)
        self.metrics = Metrics()
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
                metrics=self.metrics,
                actions_ready=self.actions_ready,
            )
            for n in range(1, config.upload.workers + 1)
        ]
        self.finisher = Finisher(self.stop, config, ledger, self.actions_ready, clock=clock)
        poll_seconds = config.indexing.poll_seconds
        self.indexer = Indexer(self.stop, ledger, client, poll_seconds) if poll_seconds else None
        listen = config.indexing.listen
        self.callbacks = CallbackListener(self.stop, ledger, client, listen) if listen else None
        self.workers: list[Worker] = [
            self.scanner,
            self.settler,
            *self.uploaders,
            self.finisher,
            *(worker for worker in (self.indexer, self.callbacks) if worker is not None),
        ]
        self.threads: list[threading.Thread] = []
        self.notifier = Notifier()
        self.monitor = MonitorServer(config, ledger, self.metrics, self.health) if config.monitor.listen else None
        # Each worker's longest healthy quiet spell: a whole rescan interval and a scan for the scanner, one
        # probe for the settler, a rate-limiter slot and one request's timeouts for an uploader.
        upload_quiet = len(self.uploaders) / config.upload.rate_per_second + sum(client.upload_timeout)
        self.allowances = {
            self.scanner.name: config.watch.rescan_seconds + SCAN_SECONDS + STALL_MARGIN_SECONDS,
            self.settler.name: config.upload.probe_timeout_seconds + STALL_MARGIN_SECONDS,
            **{uploader.name: upload_quiet + STALL_MARGIN_SECONDS for uploader in self.uploaders},
            # A move to another filesystem copies up to 3 GiB in one loop.
            self.finisher.name: SCAN_SECONDS + STALL_MARGIN_SECONDS,
            "indexer": (poll_seconds or 0)
            + (len(config.folders) + 1) * (MAX_PAGES / 4 + sum(client.timeout))
            + STALL_MARGIN_SECONDS,
            "callbacks": ACCEPT_WAIT_SECONDS + STALL_MARGIN_SECONDS,
        }
        self.progress_seen: dict[str, float] = {}
        for uploader in self.uploaders:
            uploader.on_progress = functools.partial(self._saw_progress, uploader.name)
        self.ledger_moved_at = time.monotonic()
        self.main_loop_at = time.monotonic()
        self._counts: dict[str, int] = {}
        self._next_status = 0.0

    def request_stop(self) -> None:
        """Safe from a signal handler: the first call is a warm stop, the next abandons uploads in flight."""
        if self.stop.is_set():
            self.abandon.set()
        self.stop.set()
        self.wake.set()
        self.uploads_ready.set()
        self.actions_ready.set()
        self.scanner.request(None)

    def request_reload(self) -> None:
        """Safe from a signal handler: the main loop checks the new config, then switches or keeps the old."""
        self.reload_requested.set()

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
        if self.monitor is not None:
            try:
                self.monitor.start()
            except OSError as error:
                # Uploads matter more than their monitoring: carry on, and say so loudly.
                log.error("the monitor cannot listen; running without it", listen=self.monitor.url, error=str(error))
                self.monitor = None

    def idle(self) -> bool:
        """Nothing left to do now: the first scan is done and only future retries remain."""
        if not self.scanner.first_scan_done.is_set() or any(u.busy.is_set() for u in self.uploaders):
            return False
        folders = [folder.path for folder in self.config.folders]
        return self.ledger.due_count(folders) == 0 and self.ledger.due_action() is None

    def run(self) -> int:
        """Run until stopped (or, with once, until idle); returns the process exit code."""
        self.start()
        log.info("started", folders=len(self.config.folders), once=self.once, workers=len(self.uploaders))
        self.notifier.ready(self.status_summary() or "started")
        code = 0
        while not self.stop.wait(0.2):
            self.main_loop_at = time.monotonic()
            if self.watcher is not None:
                self.watcher.supervise()
            self.report()
            if self.reload_requested.is_set() and self.reload():
                break
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

    def reload(self) -> bool:
        """Check the config file again: True to restart with the new one, False to keep running with the old."""
        self.reload_requested.clear()
        if self.loader is None:
            return False
        try:
            config = self.loader()
        except ConfigError as error:
            log.error(
                "the new config is invalid; keeping the one in use", config=str(error.path), problems=error.problems
            )
            return False
        if config == self.config:
            log.info("the config is unchanged", config=str(config.source))
            return False
        log.warning("the config changed; restarting the workers with it", config=str(config.source))
        self.reloaded = config
        return True

    def report(self) -> None:
        """Refresh systemd's status line every few seconds, and ping its watchdog while everything is alive."""
        if time.monotonic() >= self._next_status:
            self._next_status = time.monotonic() + STATUS_SECONDS
            summary = self.status_summary()
            if summary is not None:
                self.notifier.status(summary)
        self.notifier.watchdog(self.stalled)

    def status_summary(self) -> str | None:
        try:
            document = self.ledger.status()
        except sqlite3.Error as error:
            log.warning("cannot read the ledger for the status line", error=str(error))
            return None
        if document["counts"] != self._counts:
            self._counts = document["counts"]
            self.ledger_moved_at = time.monotonic()
        return status_line(document, len(self.config.folders), self.stalled())

    def _saw_progress(self, name: str, bytes_sent: int) -> None:
        self.progress_seen[name] = time.monotonic()

    def _last_sign_of_life(self, worker: Worker, now: float) -> float:
        signs = [worker.heartbeat, self.progress_seen.get(worker.name, worker.heartbeat)]
        if worker is self.settler:
            # One pass over many pending files is one loop: each file it settles moves the ledger's counts.
            signs.append(self.ledger_moved_at)
        if isinstance(worker, UploadWorker) and self.gate.pause is not None:
            # A pause holds every uploader inside one loop for as long as it lasts.
            signs.append(now)
        return max(signs)

    def stalled(self) -> list[str]:
        """Dead or stalled workers and dead observers: what a restart would cure, so what withholds the watchdog."""
        now = time.monotonic()
        problems = []
        # strict=False: before start() there are no threads, and so nothing to judge.
        for worker, thread in zip(self.workers, self.threads, strict=False):
            allowance = self.allowances[worker.name]
            if not thread.is_alive():
                problems.append(f"{worker.name}: its thread has ended")
            elif now - self._last_sign_of_life(worker, now) > allowance:
                problems.append(f"{worker.name}: no sign of life for over {allowance:.0f} s")
        if self.watcher is not None:
            problems += [
                f"the {mode} observer is not running"
                for mode, observer in list(self.watcher.observers.items())
                if not observer.is_alive()
            ]
        return problems

    def health(self) -> list[str]:
        """What /healthz reports: stalled(), a stuck main loop, and whatever Watcher.health() finds wrong."""
        if not self.threads:
            return ["starting"]
        if self.stop.is_set():
            return ["stopping"]
        problems = self.stalled()
        quiet = time.monotonic() - self.main_loop_at
        if quiet > MAIN_LOOP_SECONDS:
            problems.append(f"the main loop has not run for {quiet:.0f} s")
        if self.watcher is not None:
            problems += self.watcher.health()
        return list(dict.fromkeys(problems))

    def shutdown(self) -> None:
        self.notifier.stopping()
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
        if self.monitor is not None:
            self.monitor.stop()
        prober.close()
        log.info("stopped")
