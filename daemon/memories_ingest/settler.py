"""The settler: waits until a file stops changing, then validates it into the upload queue, or refuses it."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import structlog

from . import probe
from .config import Config, Folder
from .files import NotRegular, Version, fingerprint, open_beneath
from .ledger import Ledger, Row
from .pacing import RetryPolicy
from .states import PENDING
from .worker import Events, Worker

log = structlog.get_logger()

# Backoff for a file that cannot be read now (a permission, an I/O error): it says nothing about the file.
READ_RETRY_POLICY = RetryPolicy()


class Settler(Worker):
    """Waits until a file stops changing, then validates it: queued, rejected, or a known duplicate."""

    name = "settler"

    def __init__(
        self,
        *,
        config: Config,
        ledger: Ledger,
        events: Events,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(events.stop)
        self.config = config
        self.ledger = ledger
        self.wake = events.wake
        self.uploads_ready = events.uploads_ready
        self.actions_ready = events.actions_ready
        self.clock = clock

    @property
    def quiet_seconds(self) -> float:
        """One probe; each file settled moves the ledger, which the daemon also counts as a sign of life."""
        return self.config.upload.probe_timeout_seconds

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
            self.ledger.mark_gone(row.id, only_from=(PENDING,))
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
            self.ledger.mark_gone(row.id, only_from=(PENDING,))
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
        self.ledger.mark_rejected(row.id, reason, only_from=(PENDING,))
        log.warning(
            "rejected",
            path=str(row.path),
            unique_id=row.unique_id,
            state="rejected",
            attempt=row.attempts,
            reason=reason,
        )
