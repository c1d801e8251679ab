"""The running daemon: starts the workers pipeline.build made, supervises them, and stops them warm or cold."""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from . import prober, view
from .config import Config
from .configfile import ConfigError
from .exits import Exit
from .ledger import Ledger, LedgerError, Pause
from .notifier import Notifier
from .pacing import RetryPolicy
from .pipeline import build
from .signals import Signals
from .uploader import Client
from .worker import FILE_RETRY_POLICY, Events, UploadWorker, Worker

if TYPE_CHECKING:
    from .monitor import MonitorServer

log = structlog.get_logger()


# How long a worker may show no sign of life beyond the longest wait its config allows: room for a slow disk,
# a ledger busy in another process, a loaded host.
STALL_MARGIN_SECONDS = 120.0
# The main loop turns several times a second; this long without it, supervision and the watchdog have stopped.
MAIN_LOOP_SECONDS = 60.0


def pause_for_another_ledger(ledger: Ledger, earlier: str) -> str:
    """Pause every upload until a person decides: sending now would upload again what an earlier ledger knew."""
    reason = (
        f"{earlier}. Uploading now would send again every file that ledger knew. Run `memories-ingest rebuild` to "
        "recover what was delivered from list_videos, or `memories-ingest resume` to upload everything anyway"
    )
    ledger.set_pause(Pause(reason=reason, since=time.time(), until=None, kind="ledger"))
    return reason


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
        once: bool,
        grace_seconds: float,
        signals: Signals,
        loader: Callable[[], Config] | None = None,
        policy: RetryPolicy = FILE_RETRY_POLICY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.loader = loader
        self.signals = signals
        self._reloads_seen = signals.reloads
        self.reloaded: Config | None = None
        self.ledger = ledger
        self.client = client
        self.once = once
        self.grace_seconds = grace_seconds
        self.events = Events.create(stop=threading.Event(), abandon=threading.Event())
        self.pipeline = build(
            config, ledger, client, events=self.events, policy=policy, clock=clock, watch=not once, index=True
        )
        self.scanner = self.pipeline.scanner
        self.uploaders = self.pipeline.uploaders
        self.watcher = self.pipeline.watcher
        self.workers = self.pipeline.workers
        self.allowances = {worker.name: worker.quiet_seconds + STALL_MARGIN_SECONDS for worker in self.workers}
        self.threads: list[threading.Thread] = []
        self.notifier = Notifier()
        self.monitor: MonitorServer | None = None
        if config.monitor.listen:
            # Loaded only when asked for: werkzeug is a cost a daemon without a monitor need not pay.
            from .monitor import MonitorServer

            self.monitor = MonitorServer(config, ledger, self.pipeline.metrics, self.health)
        self.progress_seen: dict[str, float] = {}
        for uploader in self.uploaders:
            uploader.on_progress = functools.partial(self._saw_progress, uploader.name)
        self.ledger_moved_at = time.monotonic()
        self.ledger_lost: str | None = None
        self.main_loop_at = time.monotonic()
        self._counts: dict[str, int] = {}
        self._next_status = 0.0
        self.started_at = time.time()

    def request_stop(self) -> None:
        """Safe from a signal handler: the first call is a warm stop, the next abandons uploads in flight."""
        self.signals.stops += 1

    def request_reload(self) -> None:
        """Safe from a signal handler: the main loop checks the new config, then switches or keeps the old."""
        self.signals.reloads += 1

    def _stop_workers(self) -> None:
        self.events.stop_all()
        self.scanner.request(None)

    def start(self) -> None:
        self.started_at = time.time()
        self.ledger.update_setting(view.REJECTED_RELOAD_KEY, lambda _: (None, None))
        earlier = self.ledger.earlier_ledger()
        if earlier is not None and self.ledger.pause() is None:
            reason = pause_for_another_ledger(self.ledger, earlier)
            log.error("UPLOADS PAUSED: THIS IS NOT THE LEDGER THAT WAS HERE BEFORE", reason=reason)
        pause = self.ledger.pause()
        if pause is not None and pause.cause in ("key", "permission") and pause.key_id != self.client.key_id:
            self.ledger.clear_pause()
            log.warning("a different API key: the pause its predecessor caused is lifted", was=pause.reason)
        requeued = self.ledger.requeue_orphans()
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
        code = Exit.OK
        # Once, the loop's only job is to notice the end: a shorter turn ends `run --once` that much sooner.
        turn = 0.05 if self.once else 0.2
        while not self.events.stop.wait(turn) and not self.signals.stops:
            self.main_loop_at = time.monotonic()
            gone = self.ledger.gone()
            if gone is not None:
                log.error("LEDGER GONE: stopping, so that nothing is uploaded twice", reason=gone)
                self.ledger_lost = gone
                break
            if self.watcher is not None:
                self.watcher.supervise()
            self.report()
            if self.signals.reloads != self._reloads_seen and self.reload():
                break
            if not self.once:
                continue
            pause = self.pipeline.gate.pause
            if pause is not None and pause.kind in ("account", "ledger"):
                log.error("stopping: uploads are paused", reason=pause.reason)
                code = Exit.PAUSED
                break
            if self.idle():
                break
        self.shutdown()
        if self.ledger_lost is not None:
            return Exit.LEDGER_WRITE
        fatal = next((worker.fatal for worker in self.workers if worker.fatal), None)
        if fatal is not None:
            log.error("stopping: the ledger cannot be written; nothing was lost", error=str(fatal))
            return Exit.LEDGER_WRITE
        return code

    def reload(self) -> bool:
        """Check the config file again: True to restart with the new one, False to keep running with the old."""
        self._reloads_seen = self.signals.reloads
        if self.loader is None:
            return False
        try:
            config = self.loader()
        except ConfigError as error:
            log.error(
                "the new config is invalid; keeping the one in use", config=str(error.path), problems=error.problems
            )
            rejected = {"at": time.time(), "config": error.path, "problems": error.problems}
            self.ledger.update_setting(view.REJECTED_RELOAD_KEY, lambda _: (rejected, None))
            return False
        # The config on disk is good again, whatever it was rejected for before.
        self.ledger.update_setting(view.REJECTED_RELOAD_KEY, lambda _: (None, None))
        if config == self.config:
            log.info("the config is unchanged", config=str(config.source))
            return False
        log.warning("the config changed; restarting the workers with it", config=str(config.source))
        self.reloaded = config
        return True

    def report(self) -> None:
        """Every few seconds: publish for `status`, refresh systemd's status line; ping its watchdog while alive."""
        if time.monotonic() >= self._next_status:
            self._next_status = time.monotonic() + view.PUBLISH_SECONDS
            self.publish()
            requeued = self.ledger.requeue_orphans()
            if requeued:
                log.warning("uploads left by a process that died go back to the queue", rows=requeued)
            summary = self.status_summary()
            if summary is not None:
                self.notifier.status(summary)
            self.remember_ledger()
        self.notifier.watchdog(self.stalled)

    def summary(self) -> str:
        """One line on what this run did, for `run --once`."""
        done = self.ledger.since(self.started_at, [folder.path for folder in self.config.folders])
        return (
            f"run --once: {done['uploaded']} uploaded, {done['rejected']} rejected, {done['failed']} failed, "
            f"{done['left']} left for later"
        )

    def publish(self) -> None:
        """What `status` in another process cannot see for itself: this daemon, and how it watches each folder."""
        published = {
            "pid": os.getpid(),
            "since": self.started_at,
            "heartbeat": time.time(),
            "settle_seconds": self.config.watch.settle_seconds,
            "ceiling": self.config.upload.rate_per_second,
            "folders": self.watcher.describe() if self.watcher is not None else [],
            "next_rescan": None if self.once else self.scanner.next_full_scan,
            "ignored": sum(self.pipeline.recorder.ignored.values()),
        }
        try:
            self.ledger.update_setting(view.DAEMON_KEY, lambda _: (published, None), durable=False)
        except LedgerError as error:
            log.warning("cannot publish the daemon's state for `status`", error=str(error))

    def remember_ledger(self) -> None:
        """Note this ledger in its directory, unless it is the new one that waits for a person to decide."""
        pause = self.ledger.pause()
        if pause is not None and pause.kind == "ledger":
            return
        try:
            self.ledger.remember()
        except OSError as error:
            log.warning("cannot note the ledger in its directory", error=error.strerror)

    def status_summary(self) -> str | None:
        try:
            document = view.status(self.ledger)
        except (sqlite3.Error, LedgerError) as error:
            log.warning("cannot read the ledger for the status line", error=str(error))
            return None
        if document["counts"] != self._counts:
            self._counts = document["counts"]
            self.ledger_moved_at = time.monotonic()
        return view.status_line(document, len(self.config.folders), self.stalled())

    def _saw_progress(self, name: str, bytes_sent: int) -> None:
        self.progress_seen[name] = time.monotonic()

    def _last_sign_of_life(self, worker: Worker, now: float) -> float:
        signs = [worker.heartbeat, self.progress_seen.get(worker.name, worker.heartbeat)]
        if worker is self.pipeline.settler:
            # One pass over many pending files is one loop: each file it settles moves the ledger's counts.
            signs.append(self.ledger_moved_at)
        if isinstance(worker, UploadWorker) and (worker.waiting.is_set() or self.pipeline.gate.pause is not None):
            # A pause, or a slow learned pace, holds an uploader inside one loop for as long as it lasts.
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
        if self.events.stop.is_set():
            return ["stopping"]
        problems = self.stalled()
        quiet = time.monotonic() - self.main_loop_at
        if quiet > MAIN_LOOP_SECONDS:
            problems.append(f"the main loop has not run for {quiet:.0f} s")
        if self.watcher is not None:
            problems += self.watcher.health()
        return list(dict.fromkeys(problems))

    def shutdown(self) -> None:
        """A warm stop: uploads in flight may finish within the grace; a second request, or its end, abandons them."""
        self.notifier.stopping()
        self._stop_workers()
        if self.watcher is not None:
            self.watcher.stop()
        deadline = time.monotonic() + self.grace_seconds
        for thread in self.threads:
            while thread.is_alive() and not self.events.abandon.is_set():
                thread.join(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
                if time.monotonic() >= deadline or self.signals.stops > 1:
                    self.events.abandon.set()
            thread.join(timeout=2)
        if self.monitor is not None:
            self.monitor.stop()
        prober.close()
        if self.ledger_lost is None:
            self.remember_ledger()
        log.info("stopped")
