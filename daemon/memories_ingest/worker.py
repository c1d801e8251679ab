"""The worker's shape, and the uploaders: each claims a due row, streams the file at its slot, records the answer.

Each worker has initialize(), loop() and shutdown(), and runs under ``while not stop.is_set()``.
Idle waits are event waits, so a stop is noticed at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from . import probe
from .api import Outcome
from .config import Config, Folder
from .files import NotRegular, Version, fingerprint, identity_tag, open_beneath, wire_name
from .ledger import Ledger, LedgerError, Row
from .metrics import Metrics
from .pacing import Access, Gate, Pacer, RetryPolicy
from .uploader import (
    Abandoned,
    Client,
    FileChanged,
    ListFailed,
    SnapshotReader,
    upload_fields,
)

log = structlog.get_logger()

UNRECOGNISED_ATTEMPTS = 3
FILE_RETRY_POLICY = RetryPolicy()
# An upload that may have landed is asked about again after a quarter of the time since its send, in these bounds,
# and sent again when nothing proves it either way this long after the send.
UNCERTAIN_CHECK_FLOOR = 2.0
UNCERTAIN_CHECK_CAP = 600.0
UNCERTAIN_SECONDS = 6 * 3600.0


@dataclass(frozen=True)
class Events:
    """The flags the workers share: one to stop, one to abandon uploads in flight, and three to wake sleepers."""

    stop: threading.Event
    abandon: threading.Event
    # A file was recorded: the settler looks now rather than at its next second.
    wake: threading.Event
    # A row was queued: an idle uploader claims it now.
    uploads_ready: threading.Event
    # A file was delivered: the finisher deletes or moves it now.
    actions_ready: threading.Event

    @classmethod
    def create(cls, *, stop: threading.Event, abandon: threading.Event) -> Events:
        return cls(stop, abandon, threading.Event(), threading.Event(), threading.Event())

    def stop_all(self) -> None:
        """Stop every worker, and wake each one that sleeps on an event, so that it sees the stop at once."""
        self.stop.set()
        self.wake.set()
        self.uploads_ready.set()
        self.actions_ready.set()


class Worker:
    name = "worker"

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.fatal: LedgerError | None = None
        self.heartbeat = time.monotonic()

    @property
    def quiet_seconds(self) -> float:
        """How long a healthy worker may go without a heartbeat; the daemon adds a margin before calling it stalled."""
        raise NotImplementedError

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


class UploadWorker(Worker):
    """Claims a due row, streams the file at its slot, and records what the answer means."""

    def __init__(
        self,
        *,
        number: int,
        config: Config,
        ledger: Ledger,
        client: Client,
        pacer: Pacer,
        gate: Gate,
        events: Events,
        metrics: Metrics,
        callback_url: str | None,
        policy: RetryPolicy,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(events.stop)
        self.metrics = metrics
        self.callback_url = callback_url
        self.name = f"uploader-{number}"
        self.config = config
        self.ledger = ledger
        self.client = client
        self.pacer = pacer
        self.gate = gate
        self.uploads_ready = events.uploads_ready
        self.actions_ready = events.actions_ready
        self.abandon = events.abandon
        self.policy = policy
        self.clock = clock
        self.busy = threading.Event()
        # Set while the worker waits for its upload slot: at a slow pace that may be minutes, and healthy.
        self.waiting = threading.Event()
        self.on_progress: Callable[[int], None] | None = None

    @property
    def quiet_seconds(self) -> float:
        """One request's timeouts; its wait for a slot, and every block it sends, are signs of life."""
        return sum(self.client.upload_timeout)

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
            answered = self.send(row, folder, context)
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
        if answered is None:
            return None
        outcome, seconds = answered
        self.record(row, outcome, context)
        self.metrics.answered(outcome, row.size, seconds)
        return outcome

    def send(self, row: Row, folder: Folder, context: Mapping[str, object]) -> tuple[Outcome, float] | None:
        """Stream the file as it was validated: the answer and the seconds it took, or None if it changed."""
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
            started = time.monotonic()
            outcome = self.client.upload(
                reader,
                wire_name(row.path),
                content_type,
                upload_fields(folder, row, self.callback_url),
                before_send=self.take_slot,
            )
            return outcome, time.monotonic() - started

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
