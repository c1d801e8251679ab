"""The daemon's threads: scanner, settler and uploaders, and the gate that pauses them all.

Each worker has initialize(), loop() and shutdown(), and runs under ``while not stop.is_set()``.
Idle waits are event waits, so a stop is noticed at once.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog

from . import probe
from .api import Outcome
from .config import Config, Folder
from .files import NotRegular, Version, fingerprint, identity_tag, open_beneath, wire_name
from .ledger import Ledger, LedgerError, Row
from .monitor import Metrics
from .pacing import Access, Gate, Pacer, RetryPolicy
from .uploader import (
    Abandoned,
    Client,
    FileChanged,
    ListFailed,
    SnapshotReader,
    upload_fields,
)
from .watcher import Recorder, Watcher

log = structlog.get_logger()

UNRECOGNISED_ATTEMPTS = 3
FILE_RETRY_POLICY = RetryPolicy()
READ_RETRY_POLICY = RetryPolicy()
# An upload that may have landed is asked about again after a quarter of the time since its send, in these bounds,
# and sent again when nothing proves it either way this long after the send.
UNCERTAIN_CHECK_FLOOR = 2.0
UNCERTAIN_CHECK_CAP = 600.0
UNCERTAIN_SECONDS = 6 * 3600.0


class Worker:
    name = "worker"

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.fatal: LedgerError | None = None
        self.heartbeat = time.monotonic()

    def initialize(self) -> None:
        """Set up before the first loop."""

    def loop(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Release what initialize() took."""

    def run(self) -> None:
        try:
            self.initialize()
            while not self.stop.is_set():
                self.heartbeat = time.monotonic()
                try:
                    self.loop()
                except LedgerError:
                    raise
                except Exception:
                    log.exception("worker loop failed; carrying on", worker=self.name)
                    self.stop.wait(1.0)
        except LedgerError as error:
            # Carrying on would turn a full or read-only disk into a loop of half-recorded work.
            self.fatal = error
            self.stop.set()
        finally:
            self.shutdown()


class ProgressWriter:
    """Writes an upload's progress to the ledger at most once a second, for `status` in other processes."""

    INTERVAL = 1.0

    def __init__(self, ledger: Ledger, row_id: int, listener: Callable[[int], None] | None = None) -> None:
        self.ledger = ledger
        self.row_id = row_id
        self.listener = listener
        self.last = time.monotonic()

    def __call__(self, bytes_sent: int) -> None:
        if self.listener:
            self.listener(bytes_sent)
        now = time.monotonic()
        if now - self.last >= self.INTERVAL:
            self.last = now
            self.ledger.mark_progress(self.row_id, bytes_sent)


class Scanner(Worker):
    """The reconcile scan: at start-up, every rescan_seconds, and at once for any directory that needs it."""

    name = "scanner"

    def __init__(self, stop: threading.Event, config: Config, recorder: Recorder, watcher: Watcher | None) -> None:
        super().__init__(stop)
        self.config = config
        self.recorder = recorder
        self.watcher = watcher
        self.requests: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self.first_scan_done = threading.Event()
        # When the next full rescan is due, as a wall-clock time for `status`.
        self.next_full_scan = time.time()

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


class Settler(Worker):
    """Waits until a file stops changing, then validates it: queued, rejected, or a known duplicate."""

    name = "settler"

    def __init__(
        self,
        stop: threading.Event,
        config: Config,
        ledger: Ledger,
        wake: threading.Event,
        uploads_ready: threading.Event,
        clock: Callable[[], float] = time.time,
        *,
        actions_ready: threading.Event | None = None,
    ) -> None:
        super().__init__(stop)
        self.config = config
        self.ledger = ledger
        self.wake = wake
        self.uploads_ready = uploads_ready
        self.actions_ready = actions_ready or threading.Event()
        self.clock = clock

    def loop(self) -> None:
        self.wake.clear()
        next_due: float | None = None
        for row in self.ledger.pending():
            if self.stop.is_set():
                return
            due = self.settle(row)
            if due is not None:
                next_due = due if next_due is None else min(next_due, due)
        wait = 1.0 if next_due is None else min(1.0, max(0.02, next_due - self.clock()))
        self.wake.wait(wait)

    def settle(self, row: Row) -> float | None:
        """Check one pending row; returns when to look again, or None when it left `pending`."""
        folder = self.config.folder_for(row.path)
        if folder is None:
            return None
        reason = probe.check_name(row.path)
        if reason:
            self._reject(row, reason)
            return None
        try:
            info = os.stat(row.path, follow_symlinks=False)
        except FileNotFoundError:
            self.ledger.mark_gone(row.id)
            log.info(
                "file gone before upload",
                path=str(row.path),
                unique_id=row.unique_id,
                state="gone",
                attempt=row.attempts,
            )
            return None
        except OSError as error:
            return self._unreadable(row, error)
        if not stat.S_ISREG(info.st_mode):
            self._reject(row, "not a regular file")
            return None
        if not row.version.same_as(Version.of(info)):
            self.ledger.note_changed(row.id, Version.of(info))
            return self.clock() + self.config.watch.settle_seconds
        due = max(row.stable_since + self.config.watch.settle_seconds, row.next_attempt_at or 0.0)
        if self.clock() < due:
            return due
        self.validate(row, folder)
        return None

    def _unreadable(self, row: Row, error: OSError) -> float:
        """A permission or an I/O error says nothing about what the file is: look again later, with backoff."""
        at = self.clock() + READ_RETRY_POLICY.delay(row.read_errors + 1)
        reason = f"cannot be read now, will try again: {error.strerror or error}"
        self.ledger.mark_unreadable(row.id, at, reason)
        log.warning(
            "cannot read a file; trying again later",
            path=str(row.path),
            unique_id=row.unique_id,
            state="pending",
            reason=reason,
            retry_in=round(at - self.clock(), 1),
        )
        return at

    def validate(self, row: Row, folder: Folder) -> None:
        try:
            with open_beneath(folder.path, row.path, follow_symlinks=self.config.watch.follow_symlinks) as (fd, info):
                if not row.version.same_as(Version.of(info)):
                    self.ledger.note_changed(row.id, Version.of(info))
                    return
                self.check_policy(folder, info)
                probe.check_header(fd, info.st_size)
                media = probe.probe_fd(
                    fd, require_audio=folder.require_audio, timeout=self.config.upload.probe_timeout_seconds
                )
                content = fingerprint(fd, info.st_size)
        except FileNotFoundError:
            self.ledger.mark_gone(row.id)
            return
        except (probe.Rejection, NotRegular) as rejection:
            if self.stop.is_set():
                # A shutdown signal may have reached the probe too: check the file again next time.
                return
            self._reject(row, str(rejection))
            return
        except OSError as error:
            self._unreadable(row, error)
            return
        original = self.ledger.delivered_copy(row, content)
        if original is not None:
            self.ledger.mark_duplicate(row, content, original, action=folder.action)
            self.actions_ready.set()
            log.info(
                "already uploaded",
                path=str(row.path),
                unique_id=row.unique_id,
                state=original.state if original.id != row.id else row.prior_state,
                attempt=row.attempts,
                video_no=original.video_no,
                same_as=str(original.path),
            )
            return
        if self.ledger.mark_queued(row, content, media.to_json()):
            log.info(
                "queued",
                path=str(row.path),
                unique_id=row.unique_id,
                state="queued",
                attempt=row.attempts,
                codec=media.video_codec,
                size=row.size,
            )
            self.uploads_ready.set()

    def check_policy(self, folder: Folder, info: os.stat_result) -> None:
        """Hard links and other people's files: either can smuggle in a file its writer could not read."""
        watch = self.config.watch
        if watch.hardlinks == "reject" and info.st_nlink > 1:
            raise probe.Rejection(f"the file has {info.st_nlink} hard links, and watch.hardlinks is reject")
        if watch.other_owners == "reject":
            owner = os.stat(folder.path).st_uid
            if info.st_uid != owner:
                raise probe.Rejection(
                    f"the file belongs to uid {info.st_uid}, not to the folder's owner (uid {owner}), "
                    "and watch.other_owners is reject"
                )

    def _reject(self, row: Row, reason: str) -> None:
        self.ledger.mark_rejected(row.id, reason)
        log.warning(
            "rejected",
            path=str(row.path),
            unique_id=row.unique_id,
            state="rejected",
            attempt=row.attempts,
            reason=reason,
        )


class UploadWorker(Worker):
    """Claims a due row, streams the file at its slot, and records what the answer means."""

    def __init__(
        self,
        *,
        stop: threading.Event,
        number: int,
        config: Config,
        ledger: Ledger,
        client: Client,
        pacer: Pacer,
        gate: Gate,
        uploads_ready: threading.Event,
        actions_ready: threading.Event,
        abandon: threading.Event,
        metrics: Metrics,
        callback_url: str | None = None,
        policy: RetryPolicy = FILE_RETRY_POLICY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(stop)
        self.metrics = metrics
        self.callback_url = callback_url
        self.name = f"uploader-{number}"
        self.config = config
        self.ledger = ledger
        self.client = client
        self.pacer = pacer
        self.gate = gate
        self.uploads_ready = uploads_ready
        self.actions_ready = actions_ready
        self.abandon = abandon
        self.policy = policy
        self.clock = clock
        self.busy = threading.Event()
        # Set while the worker waits for its upload slot: at a slow pace that may be minutes, and healthy.
        self.waiting = threading.Event()
        self.on_progress: Callable[[int], None] | None = None

    def loop(self) -> None:
        access = self.gate.wait_open(self.stop)
        if access is Access.STOPPED:
            return
        outcome: Outcome | None = None
        try:
            if self.gate.indexing_window_full(self.config.upload.max_indexing):
                return
            self.waiting.set()
            try:
                if not self.pacer.wait_turn(self.stop):
                    return
            finally:
                self.waiting.clear()
            row = self.ledger.claim(folder.path for folder in self.config.folders)
            if row is None:
                self.uploads_ready.wait(0.5)
                self.uploads_ready.clear()
                return
            outcome = self.attempt(row)
        finally:
            self.settle_gate(outcome, trial=access is Access.TRIAL)

    def attempt(self, row: Row) -> Outcome | None:
        """Upload one claimed row, whatever happens: an error of the daemon's own is recorded, never left behind."""
        self.busy.set()
        try:
            return self.upload(row)
        except LedgerError:
            raise
        except Exception as error:
            log.exception(
                "uploading a file failed inside the daemon",
                path=str(row.path),
                unique_id=row.unique_id,
                state="uploading",
            )
            self.record_internal_error(row, error)
            return None
        finally:
            self.busy.clear()

    def settle_gate(self, outcome: Outcome | None, *, trial: bool) -> None:
        """Tell the gate what this attempt said about the account; a trial always ends here."""
        if outcome is not None and outcome.kind == "account":
            self.gate.account_refused(outcome)
        elif trial and outcome is not None and outcome.kind in ("uploaded", "refused", "duplicate"):
            self.gate.answered()
        elif trial:
            self.gate.end_trial()

    def record_internal_error(self, row: Row, error: Exception) -> None:
        message = f"an error inside the daemon: {type(error).__name__}: {error}"
        if row.attempts >= UNRECOGNISED_ATTEMPTS:
            self.ledger.mark_failed(row.id, message)
            log.error("failed", state="failed", reason=message, path=str(row.path), unique_id=row.unique_id)
            return
        delay = self.policy.delay(row.attempts)
        self.ledger.mark_retry(row.id, self.clock() + delay, message)
        log.warning(
            "upload failed; will retry", state="retrying", reason=message, path=str(row.path), unique_id=row.unique_id
        )

    def take_slot(self) -> None:
        """The connection is open: wait for the upload's slot, and send at once."""
        self.waiting.set()
        try:
            if self.pacer.acquire(self.stop) is None:
                raise Abandoned("shutting down before the upload's slot")
        finally:
            self.waiting.clear()

    def upload(self, row: Row) -> Outcome | None:
        """Send one file; returns the API's answer, or None when no request was answered."""
        folder = self.config.folder_for(row.path)
        context = {"path": str(row.path), "unique_id": row.unique_id, "attempt": row.attempts}
        if folder is None:
            self.ledger.release(row.id)
            return None
        if row.sent_at is not None and self.reconcile(row, context):
            return None
        try:
            with open_beneath(folder.path, row.path, follow_symlinks=self.config.watch.follow_symlinks) as (fd, info):
                unchanged = row.version.same_as(Version.of(info))
                if not unchanged or (row.fingerprint and fingerprint(fd, info.st_size) != row.fingerprint):
                    self.ledger.mark_changed(row.id)
                    log.info("file changed before upload; settling again", state="pending", **context)
                    return None
                log.info("uploading", state="uploading", size=row.size, **context)
                reader = SnapshotReader(
                    fd,
                    info,
                    str(row.path),
                    self.abandon,
                    before_last_block=lambda: self.ledger.mark_sent(row.id),
                    progress=ProgressWriter(self.ledger, row.id, self.on_progress),
                )
                content_type = probe.content_type_for(row.path) or "video/mp4"
                upload_started = time.monotonic()
                outcome = self.client.upload(
                    reader,
                    wire_name(row.path),
                    content_type,
                    upload_fields(folder, row, self.callback_url),
                    before_send=self.take_slot,
                )
        except FileNotFoundError:
            self.ledger.mark_gone(row.id)
            log.info("file gone before upload", state="gone", **context)
            return None
        except FileChanged as change:
            self.ledger.mark_changed(row.id)
            self.metrics.retried("changed")
            log.warning(
                "upload abandoned: the file changed; settling again", state="pending", reason=str(change), **context
            )
            return None
        except Abandoned:
            self.ledger.release(row.id, "upload abandoned at shutdown")
            self.metrics.retried("abandoned")
            log.warning("upload abandoned at shutdown; it goes first next time", state="queued", **context)
            return None
        except NotRegular as error:
            self.ledger.mark_rejected(row.id, str(error))
            log.warning("rejected", state="rejected", reason=str(error), **context)
            return None
        except OSError as error:
            reason = f"cannot be opened now, will try again: {error.strerror or error}"
            delay = self.policy.delay(row.attempts)
            self.ledger.mark_retry(row.id, self.clock() + delay, reason, answered=True)
            log.warning(
                "upload failed; will retry", state="retrying", reason=reason, retry_in=round(delay, 1), **context
            )
            return None
        self.record(row, outcome, context)
        self.metrics.answered(outcome, row.size, time.monotonic() - upload_started)
        return outcome

    def reconcile(self, row: Row, context: Mapping[str, object]) -> bool:
        """An earlier attempt sent the whole body but no answer was stored: ask the server before sending again.

        True when the row is settled here (it landed, or it stays uncertain); False to send the file now. A
        video is taken for this file's only on proof: its identity tag, or (when the server names videos after
        their files) the one video of its name and size, which no other file in doubt could also claim.
        """
        assert row.sent_at is not None and row.fingerprint is not None
        try:
            evidence = self.client.find_upload(
                unique_id=row.unique_id,
                tag=identity_tag(row.fingerprint),
                size=row.size,
                stem=row.path.stem,
                sent_at=row.sent_at,
                known=self.ledger.delivered_video_numbers(),
            )
        except ListFailed as error:
            self.stay_uncertain(row, f"an earlier upload may have landed, and list_videos cannot tell: {error}")
            return True
        if evidence.landed is not None:
            note = "recovered from list_videos: it carries this file's identity tag"
            if evidence.copies > 1:
                note += f"; the server holds {evidence.copies} copies, {evidence.copies - 1} of them duplicates"
                self.metrics.duplicates_found(evidence.copies - 1)
                log.warning("duplicate uploads of one file", state="uploaded", copies=evidence.copies, **context)
            self.recovered(row, evidence.landed.video_no, note, context)
            return True
        if len(evidence.named) == 1 and not self.ledger.others_in_doubt(row):
            note = "recovered from list_videos: the only video of its name and size since the send"
            self.recovered(row, evidence.named[0].video_no, note, context)
            return True
        if not evidence.unproven:
            self.ledger.mark_answered(row.id)
            log.info("an unanswered upload did not land; sending again", state="uploading", **context)
            return False
        if self.clock() - row.sent_at >= UNCERTAIN_SECONDS:
            self.ledger.mark_answered(row.id)
            self.metrics.possible_duplicate()
            log.warning(
                "POSSIBLE DUPLICATE: an upload still unproven either way after 6 h is sent again",
                unproven=len(evidence.unproven),
                state="uploading",
                **context,
            )
            return False
        self.stay_uncertain(
            row,
            f"an earlier upload may have landed: {len(evidence.unproven)} video(s) of its size are not parsed yet, "
            "and only their tags can tell; asking again",
        )
        return True

    def recovered(self, row: Row, video_no: str, note: str, context: Mapping[str, object]) -> None:
        folder = self.config.folder_for(row.path)
        self.ledger.mark_uploaded(row, video_no, note, action=folder.action if folder else None)
        self.actions_ready.set()
        log.warning(
            "an unanswered upload had landed; not sending it again", state="uploaded", video_no=video_no, **context
        )

    def stay_uncertain(self, row: Row, why: str) -> None:
        """Ask again later, sooner while the send is recent: parsing, which lists the tags, takes minutes."""
        assert row.sent_at is not None
        delay = min(UNCERTAIN_CHECK_CAP, max(UNCERTAIN_CHECK_FLOOR, (self.clock() - row.sent_at) / 4))
        self.ledger.mark_uncertain(row.id, self.clock() + delay, why)
        log.warning("uncertain whether an upload landed", state="uncertain", reason=why, path=str(row.path))

    def record(self, row: Row, outcome: Outcome, context: Mapping[str, object]) -> None:
        """Store what an answer means for the file; the gate hears what it means for the account in loop()."""
        if outcome.kind == "uploaded":
            assert outcome.video_no is not None
            self.pacer.accepted()
            folder = self.config.folder_for(row.path)
            self.ledger.mark_uploaded(row, outcome.video_no, action=folder.action if folder else None)
            self.actions_ready.set()
            log.info("uploaded", state="uploaded", video_no=outcome.video_no, **context)
        elif outcome.kind == "rate_limited":
            self.pacer.limited(outcome.retry_after)
            self.ledger.release(row.id, outcome.message)
        elif outcome.kind == "account":
            self.ledger.release(row.id, outcome.reason)
        elif outcome.kind == "refused":
            self.ledger.mark_failed(row.id, outcome.message)
            log.error("failed: the server refused the file", state="failed", reason=outcome.message, **context)
        elif outcome.kind == "duplicate":
            delay = self.policy.delay(row.attempts)
            why = f"{outcome.message}: {outcome.advice}"
            self.ledger.mark_uncertain(row.id, self.clock() + delay, why, attempted=True)
            log.warning(
                "the API refused a duplicate request; asking list_videos before sending again",
                state="uncertain",
                reason=outcome.message,
                retry_in=round(delay, 1),
                **context,
            )
        elif outcome.kind == "unrecognised" and row.attempts >= UNRECOGNISED_ATTEMPTS:
            message = f"{outcome.message} (an answer this daemon does not recognise, {row.attempts} times)"
            self.ledger.mark_failed(row.id, message)
            log.error("failed", state="failed", reason=message, **context)
        else:
            delay = max(self.policy.delay(row.attempts), outcome.retry_after or 0.0)
            self.ledger.mark_retry(row.id, self.clock() + delay, outcome.message, answered=outcome.answered)
            log.warning(
                "upload failed; will retry",
                state="retrying",
                reason=outcome.message,
                retry_in=round(delay, 1),
                **context,
            )
