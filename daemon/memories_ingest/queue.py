"""The upload queue in the ledger: claiming a row, and recording what became of each attempt to send it.

A claim names its process, so that a process that dies leaves rows anyone can take over, and a live one's rows
are never taken. From the last block of a body until an answer is stored, a row's `sent_at` says it may have
landed; such a row goes back to the queue as `uncertain`, to be checked with list_videos before it is sent again.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Collection, Iterable
from pathlib import Path

from .custody import process_alive, this_process
from .keys import redact
from .schema import Row, key
from .states import (
    DELIVERED,
    DUE,
    FAILED,
    INDEX_FAILED,
    INDEXED,
    PENDING,
    QUEUED,
    RETRYABLE,
    RETRYING,
    UNCERTAIN,
    UPLOADED,
    UPLOADING,
    State,
)
from .store import Store

_CLAIMED = "attempts = attempts + 1, bytes_sent = 0, started_at = ?, updated_at = ?, claimed_by = ?"


class UploadQueue(Store):
    def claim(self, folders: Iterable[Path]) -> Row | None:
        """Take the next due row for upload; the row is `uploading` when this returns it."""
        folder_keys = [key(f) for f in folders]
        if not folder_keys:
            return None
        now = self.clock()
        with self._write() as conn:
            # By state: left to choose, SQLite takes the folder's index and reads every delivered row of the
            # folder, twice a second per uploader, on a daemon with nothing to do.
            found = conn.execute(
                f"SELECT id FROM files INDEXED BY files_state WHERE state IN ({','.join('?' * len(DUE))})"
                " AND next_attempt_at <= ?"
                f" AND folder IN ({','.join('?' * len(folder_keys))}) ORDER BY next_attempt_at, id LIMIT 1",
                [*DUE, now, *folder_keys],
            ).fetchone()
            if found is None:
                return None
            self._move(conn, found["id"], UPLOADING, _CLAIMED, [now, now, this_process()], only_from=DUE)
        return self.get_id(found["id"])

    def claim_row(self, row_id: int) -> Row | None:
        """Take one particular row for upload, if it is queued or its retry is due (the `upload` command)."""
        now = self.clock()
        with self._write() as conn:
            claimed = self._move(
                conn,
                row_id,
                UPLOADING,
                _CLAIMED,
                [now, now, this_process()],
                only_from=DUE,
                guard="next_attempt_at <= ?",
                guard_params=[now],
            )
        return self.get_id(row_id) if claimed else None

    def mark_uploaded(self, row: Row, video_no: str, note: str | None = None, *, action: str | None = None) -> None:
        """The server gave a videoNo. `action` (delete or move) is what the finisher then does with the file."""
        now = self.clock()
        with self._write() as conn:
            self._move(
                conn,
                row.id,
                UPLOADED,
                "video_no = ?, error = ?, next_attempt_at = NULL, uploaded_at = ?, sent_at = NULL, claimed_by = NULL,"
                " action = ?, action_at = ?, action_error = NULL, action_attempts = 0, moved_to = NULL, updated_at = ?",
                [video_no, note and redact(note), now, action, now, now],
            )
            conn.execute(
                "INSERT INTO uploads (file_id, path, unique_id, fingerprint, size, video_no, uploaded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [row.id, key(row.path), row.unique_id, row.fingerprint, row.size, video_no, now],
            )

    def mark_progress(self, row_id: int, bytes_sent: int) -> None:
        """How far the upload in flight is; written about once a second, so `status` can show it."""
        with self._write() as conn:
            conn.execute("UPDATE files SET bytes_sent = ? WHERE id = ?", [bytes_sent, row_id])

    def mark_sent(self, row_id: int) -> None:
        """The whole body is about to reach the server: from here until an answer is stored, it may have landed."""
        now = self.clock()
        with self._write() as conn:
            conn.execute("UPDATE files SET sent_at = ?, updated_at = ? WHERE id = ?", [now, now, row_id])

    def mark_answered(self, row_id: int) -> None:
        """The server answered without taking the file: the upload is no longer uncertain."""
        with self._write() as conn:
            conn.execute("UPDATE files SET sent_at = NULL WHERE id = ?", [row_id])

    def mark_retry(self, row_id: int, at: float, error: str, *, answered: bool = False) -> None:
        """Try again at `at`. answered: the API itself refused this attempt, so it cannot have landed.

        A row whose whole body went out without an answer is `uncertain` instead: list_videos is asked first.
        """
        now = self.clock()
        with self._write() as conn:
            found = conn.execute("SELECT sent_at FROM files WHERE id = ?", [row_id]).fetchone()
            landed_maybe = found is not None and found["sent_at"] is not None and not answered
            self._move(
                conn,
                row_id,
                UNCERTAIN if landed_maybe else RETRYING,
                "sent_at = CASE WHEN ? THEN NULL ELSE sent_at END, next_attempt_at = ?, error = ?, claimed_by = NULL,"
                " updated_at = ?",
                [answered, at, redact(error), now],
            )

    def mark_uncertain(self, row_id: int, at: float, why: str, *, attempted: bool = False) -> None:
        """The upload may have landed, and list_videos cannot yet prove it either way: ask again at `at`.

        Asking is not an attempt at the upload, so it is not counted as one; a send that the API answered with a
        duplicate refusal is (attempted), so that its backoff grows.
        """
        now = self.clock()
        with self._write() as conn:
            self._move(
                conn,
                row_id,
                UNCERTAIN,
                "sent_at = COALESCE(sent_at, ?), next_attempt_at = ?, error = ?, claimed_by = NULL,"
                " attempts = CASE WHEN ? THEN attempts ELSE MAX(attempts - 1, 0) END, updated_at = ?",
                [now, at, redact(why), attempted, now],
            )

    def mark_failed(self, row_id: int, error: str) -> None:
        self._finish(row_id, FAILED, error)

    def release(self, row_id: int, note: str | None = None) -> None:
        """Back to the queue, not counted as an attempt: the file was not at fault, and the attempt never landed."""
        now = self.clock()
        with self._write() as conn:
            self._move(
                conn,
                row_id,
                QUEUED,
                "attempts = MAX(attempts - 1, 0), next_attempt_at = ?, sent_at = NULL, claimed_by = NULL,"
                " error = COALESCE(?, error), updated_at = ?",
                [now, note and redact(note), now],
                only_from=(UPLOADING,),
            )

    def mark_changed(self, row_id: int) -> None:
        """The file changed under an upload: settle and validate it again."""
        now = self.clock()
        with self._write() as conn:
            self._move(
                conn,
                row_id,
                PENDING,
                "attempts = MAX(attempts - 1, 0), stable_since = ?, claimed_by = NULL,"
                " error = 'the file changed during upload; waiting for it to settle', updated_at = ?",
                [now, now],
            )

    def _finish(
        self, row_id: int, state: State, reason: str | None, *, only_from: Collection[str] | None = None
    ) -> None:
        now = self.clock()
        with self._write() as conn:
            self._move(
                conn,
                row_id,
                state,
                "prior_state = NULL, error = ?, next_attempt_at = NULL, claimed_by = NULL, updated_at = ?,"
                " sent_at = CASE WHEN ? THEN NULL ELSE sent_at END",
                [reason and redact(reason), now, state == FAILED],
                only_from=only_from,
            )

    def requeue_orphans(self) -> int:
        """Rows left `uploading` by a process that died (a daemon, an `upload`): back to the queue.

        A row whose body went out becomes `uncertain` instead. A row a live process is uploading is left alone.
        """
        now = self.clock()
        with self._write() as conn:
            orphans = [
                (found["id"], found["sent_at"])
                for found in conn.execute("SELECT id, claimed_by, sent_at FROM files WHERE state = ?", [UPLOADING])
                if not process_alive(found["claimed_by"])
            ]
            for row_id, sent_at in orphans:
                self._move(
                    conn,
                    row_id,
                    QUEUED if sent_at is None else UNCERTAIN,
                    "next_attempt_at = ?, claimed_by = NULL, updated_at = ?",
                    [now, now],
                    only_from=(UPLOADING,),
                )
        return len(orphans)

    def retry(self, paths: Iterable[Path]) -> list[tuple[Path, str]]:
        """Put these files back in the queue, each validated again first; says for each what was done and why."""
        now = self.clock()
        done = []
        with self._write() as conn:
            for path in paths:
                found = conn.execute("SELECT id, state FROM files WHERE path = ?", [key(path)]).fetchone()
                if found is None:
                    done.append((path, "not in the ledger: the daemon has never seen it"))
                elif found["state"] in RETRYABLE:
                    self._requeue(conn, found["id"], now)
                    done.append((path, f"back in the queue (it was {found['state']})"))
                elif found["state"] in DELIVERED:
                    done.append((path, f"already uploaded ({found['state']}): nothing to do"))
                else:
                    done.append((path, f"on its way already ({found['state']}): nothing to do"))
        return done

    def retry_state(self, state: str) -> int:
        """Put every file in this state back in the queue; returns how many."""
        if state not in RETRYABLE:
            raise ValueError(f"rows in state {state} cannot be retried; these can: {', '.join(RETRYABLE)}")
        now = self.clock()
        with self._write() as conn:
            ids = [found[0] for found in conn.execute("SELECT id FROM files WHERE state = ?", [state])]
            for row_id in ids:
                self._requeue(conn, row_id, now)
        return len(ids)

    def _requeue(self, conn: sqlite3.Connection, row_id: int, now: float) -> None:
        self._move(
            conn,
            row_id,
            PENDING,
            "prior_state = NULL, attempts = 0, read_errors = 0, next_attempt_at = ?, stable_since = ?, updated_at = ?",
            [now, now, now],
        )

    def others_in_doubt(self, row: Row) -> bool:
        """Whether another file of the same scope, size and name may also have landed unanswered."""
        # Whatever its state: a file touched since its send is queued again with the send still in doubt.
        found = self._read(
            "SELECT path FROM files WHERE unique_id IS ? AND size = ? AND id != ? AND sent_at IS NOT NULL",
            [row.unique_id, row.size, row.id],
        )
        return any(Path(os.fsdecode(r["path"])).stem == row.path.stem for r in found)

    def delivered_video_numbers(self) -> set[str]:
        return {r[0] for r in self._read("SELECT video_no FROM uploads")}

    def uploads_since(self, since: float) -> list[float]:
        """When each upload acknowledged after `since` was made, oldest first, for files not yet indexed."""
        rows = self._read(
            "SELECT uploads.uploaded_at FROM uploads JOIN files ON files.id = uploads.file_id"
            " WHERE uploads.uploaded_at > ? AND NOT (files.video_no = uploads.video_no AND files.state IN (?, ?))"
            " ORDER BY uploads.uploaded_at",
            [since, INDEXED, INDEX_FAILED],
        )
        return [r[0] for r in rows]

    def due_count(self, folders: Iterable[Path]) -> int:
        """Rows in these folders with work to do now: settling, queued, in flight, or a retry that is due."""
        keys = [key(f) for f in folders]
        return int(
            self._read(
                f"SELECT COUNT(*) FROM files INDEXED BY files_state WHERE folder IN ({','.join('?' * len(keys))})"
                " AND (state IN (?, ?, ?) OR (state IN (?, ?) AND next_attempt_at <= ?))",
                [*keys, PENDING, QUEUED, UPLOADING, RETRYING, UNCERTAIN, self.clock()],
            )[0][0]
        )
