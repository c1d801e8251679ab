"""The ledger: one SQLite file that is both the upload queue and the record of what reached memories.ai.

Store opens the file and makes every change of state through the table in `states`; UploadQueue claims rows and
records each attempt to send one; Ledger adds the record keeping around them: what the watcher sees, what
validation finds, the pause, the finisher's actions and what memories.ai says once it has parsed a video.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .custody import Holder, LedgerHeld, LedgerLock, location_problem, remember, remembered
from .files import Version
from .keys import redact
from .queue import UploadQueue
from .schema import LedgerError, LedgerLocationError, Pause, Row, key
from .states import (
    DELIVERED,
    DUE,
    FAILED,
    GONE,
    INDEX_FAILED,
    INDEXED,
    PENDING,
    QUEUED,
    REJECTED,
    RETRYING,
    STATES,
    UNCERTAIN,
    UPLOADED,
    UPLOADING,
    State,
)

if TYPE_CHECKING:
    from .config import Folder

__all__ = [
    "Holder",
    "Ledger",
    "LedgerError",
    "LedgerHeld",
    "LedgerLocationError",
    "LedgerLock",
    "Pause",
    "Row",
    "location_problem",
]


class Ledger(UploadQueue):
    def earlier_ledger(self) -> str | None:
        """What says that this is not the ledger that kept this place before, if anything does.

        An earlier ledger's journal beside a new one; another ledger remembered in the directory with uploads (even
        once this one has some: an `upload` may have made it); or this very ledger remembered with more uploads
        than it has now (an older copy, restored from a backup).
        """
        if self.orphans:
            names = ", ".join(path.name for path in self.orphans)
            return f"this ledger is new, and an earlier ledger's journal files were beside it ({names}, now set aside)"
        memory = remembered(self.path)
        if not memory or int(memory.get("uploads", 0)) == 0:
            return None
        seen = datetime.fromtimestamp(float(memory.get("seen", 0))).strftime("%Y-%m-%d %H:%M")
        if memory.get("id") != self.ledger_id:
            return (
                f"this is not the ledger that kept {memory['uploads']} uploads here "
                f"(ledger {memory['id']}, last seen {seen})"
            )
        uploads = int(self._read("SELECT COUNT(*) FROM uploads")[0][0])
        if uploads < int(memory["uploads"]):
            return (
                f"this ledger records {uploads} uploads, but it had {memory['uploads']} when last seen ({seen}): "
                "an older copy, restored from a backup?"
            )
        return None

    def remember(self) -> None:
        """Note this ledger and its upload count in its directory, so that a ledger made after it can tell."""
        uploads = int(self._read("SELECT COUNT(*) FROM uploads")[0][0])
        remember(self.path, {"id": self.ledger_id, "uploads": uploads, "seen": self.clock()})

    # -- what the watcher and the scanner see -------------------------------------------------------------

    def record_seen(self, path: Path, folder: Path, unique_id: str | None, version: Version) -> bool:
        """Note a file as it is now. True when it needs settling: new, changed, or back after being gone."""
        now = self.clock()
        with self._write() as conn:
            found = conn.execute(
                "SELECT id, size, mtime_ns, inode, ctime_ns, state, prior_state FROM files WHERE path = ?", [key(path)]
            ).fetchone()
            if found is None:
                conn.execute(
                    "INSERT INTO files (path, folder, unique_id, size, mtime_ns, inode, ctime_ns, state, stable_since,"
                    " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [key(path), key(folder), unique_id, *version, PENDING, now, now, now],
                )
                return True
            known = Version(found["size"], found["mtime_ns"], found["inode"], found["ctime_ns"])
            unchanged = known.same_as(version)
            if unchanged and known.ctime_ns is None:
                # A row from before ctimes were kept: learn it, without taking the file for a new one.
                conn.execute("UPDATE files SET ctime_ns = ? WHERE id = ?", [version.ctime_ns, found["id"]])
            if found["state"] == UPLOADING or (unchanged and found["state"] != GONE):
                return False
            if found["state"] == PENDING:
                prior = found["prior_state"]
            elif found["state"] in (*DUE, GONE):
                prior = None
            else:
                prior = found["state"]
            self._move(
                conn,
                found["id"],
                PENDING,
                "size = ?, mtime_ns = ?, inode = ?, ctime_ns = ?, prior_state = ?, stable_since = ?, unique_id = ?,"
                " folder = ?, next_attempt_at = NULL, updated_at = ?",
                [*version, prior, now, unique_id, key(folder), now],
            )
            return True

    def known(self, folder: Path) -> dict[bytes, tuple[Version, str]]:
        """Every row under a folder, keyed by raw path: what a rescan compares the disk with."""
        rows = self._read(
            "SELECT path, size, mtime_ns, inode, ctime_ns, state FROM files WHERE folder = ?", [key(folder)]
        )
        return {r["path"]: (Version(r["size"], r["mtime_ns"], r["inode"], r["ctime_ns"]), r["state"]) for r in rows}

    def known_in(self, directory: Path | str) -> dict[bytes, tuple[int, str]]:
        """The inode and state of every row for a file directly in a directory, keyed by raw path."""
        prefix = key(directory).rstrip(b"/") + b"/"
        # The range of paths under the directory, read off the path index ("0" is the byte after "/"); rows in
        # its subdirectories are left in SQLite.
        rows = self._read(
            "SELECT path, inode, state FROM files WHERE path > ? AND path < ? AND instr(substr(path, ?), ?) = 0",
            [prefix, prefix[:-1] + b"0", len(prefix) + 1, b"/"],
        )
        return {r["path"]: (r["inode"], r["state"]) for r in rows}

    # -- settling and validation ----------------------------------------------------------------------------

    def pending(self) -> list[Row]:
        return [Row.from_sql(r) for r in self._read("SELECT * FROM files WHERE state = ? ORDER BY id", [PENDING])]

    def note_changed(self, row_id: int, version: Version) -> None:
        now = self.clock()
        with self._write() as conn:
            conn.execute(
                "UPDATE files SET size = ?, mtime_ns = ?, inode = ?, ctime_ns = ?, stable_since = ?,"
                " next_attempt_at = NULL, updated_at = ? WHERE id = ? AND state = ?",
                [*version, now, now, row_id, PENDING],
            )

    def mark_unreadable(self, row_id: int, at: float, error: str) -> None:
        """The file cannot be read now (a permission, an I/O error): it stays pending, and is tried again at `at`."""
        now = self.clock()
        with self._write() as conn:
            conn.execute(
                "UPDATE files SET read_errors = read_errors + 1, next_attempt_at = ?, error = ?, updated_at = ?"
                " WHERE id = ? AND state = ?",
                [at, redact(error), now, row_id, PENDING],
            )

    def delivered_copy(self, row: Row, fingerprint: str) -> Row | None:
        """A delivered row with the same content in the same scope: this row itself before a touch, or a copy."""
        if row.prior_state in DELIVERED and row.fingerprint == fingerprint and row.video_no:
            return row
        found = self._read(
            "SELECT * FROM files WHERE unique_id IS ? AND fingerprint = ? AND size = ? AND video_no IS NOT NULL"
            f" AND state IN ({','.join('?' * len(DELIVERED))}) AND id != ? ORDER BY id LIMIT 1",
            [row.unique_id, fingerprint, row.size, *DELIVERED, row.id],
        )
        return Row.from_sql(found[0]) if found else None

    def mark_queued(self, row: Row, fingerprint: str, media: dict[str, Any]) -> bool:
        """Validated: queue it, unless it changed since it was checked."""
        now = self.clock()
        with self._write() as conn:
            # An earlier send of other content may have landed, but that is no longer this file's question.
            return self._move(
                conn,
                row.id,
                QUEUED,
                "prior_state = NULL, media = ?, video_no = NULL,"
                " sent_at = CASE WHEN fingerprint IS ? THEN sent_at ELSE NULL END, fingerprint = ?,"
                " uploaded_at = NULL, attempts = 0, read_errors = 0, error = NULL, next_attempt_at = ?, updated_at = ?",
                [json.dumps(media), fingerprint, fingerprint, now, now],
                only_from=(PENDING,),
                guard="size = ? AND mtime_ns = ? AND inode = ? AND ctime_ns IS ?",
                guard_params=row.version,
            )

    def mark_duplicate(self, row: Row, fingerprint: str, original: Row, *, action: str | None = None) -> None:
        """Same content as a delivered row: keep its videoNo instead of sending the bytes again.

        `action` (delete or move) is what the finisher then does with this file, as after an upload.
        """
        note = None if original.id == row.id else f"same content as {original.path}, already uploaded"
        state = original.prior_state if original.id == row.id else original.state
        now = self.clock()
        with self._write() as conn:
            self._move(
                conn,
                row.id,
                State(state),
                "prior_state = NULL, fingerprint = ?, video_no = ?, error = ?, uploaded_at = COALESCE(uploaded_at, ?),"
                " action = ?, action_at = ?, action_error = NULL, action_attempts = 0, moved_to = NULL, updated_at = ?",
                [fingerprint, original.video_no, note, original.uploaded_at, action, now, now],
                only_from=(PENDING,),
            )

    def mark_rejected(self, row_id: int, reason: str, *, only_from: Collection[str] | None = None) -> None:
        """only_from: the states the caller saw; a row another process moved on meanwhile is left alone."""
        self._finish(row_id, REJECTED, reason, only_from=only_from)

    def mark_gone(
        self,
        row_id: int,
        reason: str = "the file was deleted before it was uploaded",
        *,
        only_from: Collection[str] | None = None,
    ) -> None:
        self._finish(row_id, GONE, reason, only_from=only_from)

    def record_rebuilt(
        self, path: Path, folder: Folder, version: Version, content: str, video_no: str, note: str
    ) -> None:
        """A file that list_videos proves memories.ai already holds, recorded as if this ledger had uploaded it."""
        now = self.clock()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO files (path, folder, unique_id, size, mtime_ns, inode, ctime_ns, state, stable_since,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO NOTHING",
                [key(path), key(folder.path), folder.unique_id, *version, PENDING, now, now, now],
            )
            row_id = conn.execute("SELECT id FROM files WHERE path = ?", [key(path)]).fetchone()[0]
            self._move(
                conn,
                row_id,
                UPLOADED,
                "folder = ?, unique_id = ?, size = ?, mtime_ns = ?, inode = ?, ctime_ns = ?, prior_state = NULL,"
                " fingerprint = ?, video_no = ?, error = ?, sent_at = NULL, next_attempt_at = NULL, uploaded_at = ?,"
                " action = ?, action_at = ?, updated_at = ?",
                [key(folder.path), folder.unique_id, *version, content, video_no, note, now, folder.action, now, now],
            )
            conn.execute(
                "INSERT INTO uploads (file_id, path, unique_id, fingerprint, size, video_no, uploaded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [row_id, key(path), folder.unique_id, content, version.size, video_no, now],
            )

    # -- what status and list show ------------------------------------------------------------------------

    def recent_with_error(self, states: Iterable[str], limit: int = 5) -> list[Row]:
        """The rows in these states that carry an error or a note, the latest first."""
        wanted = list(states)
        found = self._read(
            f"SELECT * FROM files WHERE error IS NOT NULL AND state IN ({','.join('?' * len(wanted))})"
            " ORDER BY updated_at DESC LIMIT ?",
            [*wanted, limit],
        )
        return [Row.from_sql(r) for r in found]

    def settling(self, limit: int = 5) -> list[Row]:
        """Pending rows, the ones that are due first first."""
        found = self._read(
            "SELECT * FROM files WHERE state = ? ORDER BY MAX(stable_since, COALESCE(next_attempt_at, 0)) LIMIT ?",
            [PENDING, limit],
        )
        return [Row.from_sql(r) for r in found]

    def recent_uploads(self, limit: int = 20) -> list[Row]:
        found = self._read(
            f"SELECT * FROM files WHERE state IN ({','.join('?' * len(DELIVERED))}) AND uploaded_at IS NOT NULL"
            " ORDER BY uploaded_at DESC LIMIT ?",
            [*DELIVERED, limit],
        )
        return [Row.from_sql(r) for r in found]

    def counts(self) -> dict[str, int]:
        found = {r[0]: r[1] for r in self._read("SELECT state, COUNT(*) FROM files GROUP BY state")}
        return {state: found.get(state, 0) for state in STATES}

    def rows(self, state: str | None = None) -> list[Row]:
        if state is None:
            found = self._read("SELECT * FROM files ORDER BY id")
        else:
            found = self._read("SELECT * FROM files WHERE state = ? ORDER BY id", [state])
        return [Row.from_sql(r) for r in found]

    def next_retry(self) -> Row | None:
        found = self._read("SELECT * FROM files WHERE state = ? ORDER BY next_attempt_at LIMIT 1", [RETRYING])
        return Row.from_sql(found[0]) if found else None

    def since(self, moment: float, folders: Iterable[Path]) -> dict[str, int]:
        """What happened to these folders' files since a moment: uploaded, rejected, failed, and what is left."""
        keys = [key(f) for f in folders]
        where = f"folder IN ({','.join('?' * len(keys))})"
        uploaded = self._read(
            f"SELECT COUNT(*) FROM uploads JOIN files ON files.id = uploads.file_id WHERE {where}"
            " AND uploads.uploaded_at >= ?",
            [*keys, moment],
        )[0][0]
        ended: dict[str, int] = dict(
            (found[0], found[1])
            for found in self._read(
                f"SELECT state, COUNT(*) FROM files WHERE {where} AND updated_at >= ? AND state IN (?, ?)"
                " GROUP BY state",
                [*keys, moment, REJECTED, FAILED],
            )
        )
        left = self._read(
            f"SELECT COUNT(*) FROM files WHERE {where} AND state IN (?, ?, ?, ?, ?)",
            [*keys, PENDING, QUEUED, UPLOADING, RETRYING, UNCERTAIN],
        )[0][0]
        return {"uploaded": uploaded, "rejected": ended.get(REJECTED, 0), "failed": ended.get(FAILED, 0), "left": left}

    # -- the pause: lifted by a person, or by a trial upload that the API accepts ---------------------------

    def set_pause(self, pause: Pause | None) -> None:
        self.update_setting("pause", lambda _: (None if pause is None else dataclasses.asdict(pause), None))

    def pause(self) -> Pause | None:
        found = self.setting("pause")
        return Pause.from_json(found) if found else None

    def resume(self, now: float) -> Pause | None:
        """A person lifts the pause: an account pause ends in a trial upload now, any other ends at once."""

        def lift(found: Any) -> tuple[Any, Pause | None]:
            pause = Pause.from_json(found) if found else None
            if pause is None or pause.kind != "account":
                return None, pause
            return {**found, "until": now}, pause

        lifted: Pause | None = self.update_setting("pause", lift)
        return lifted

    def clear_pause(self) -> Pause | None:
        """Lift the pause; returns the one lifted, if there was one."""
        if self.setting("pause") is None:
            return None
        earlier: Pause | None = self.update_setting("pause", lambda found: (None, found and Pause.from_json(found)))
        return earlier

    def take_trial(self, now: float, hold: float) -> tuple[str, float]:
        """May an upload go out now? ("open", 0); ("trial", 0) for the one trial after a pause; ("wait", seconds).

        The trial holds the pause for `hold` seconds more, so nobody else goes out until it is answered.
        """
        pause = self.pause()
        if pause is None:
            return "open", 0.0
        if pause.remaining(now) > 0:
            return "wait", pause.remaining(now)

        def take(found: Any) -> tuple[Any, tuple[str, float]]:
            current = Pause.from_json(found) if found else None
            if current is None:
                return None, ("open", 0.0)
            if current.remaining(now) > 0:
                return found, ("wait", current.remaining(now))
            if current.kind != "account":
                return None, ("open", 0.0)
            return {**found, "until": now + hold}, ("trial", 0.0)

        verdict: tuple[str, float] = self.update_setting("pause", take)
        return verdict

    def end_trial(self, now: float) -> None:
        """The trial learnt nothing about the account: let the next upload be the trial, now."""
        pause = self.pause()
        if pause is None or pause.kind != "account" or pause.remaining(now) <= 0:
            return
        self.update_setting(
            "pause",
            lambda found: ({**found, "until": min(found["until"], now)} if found else None, None),
        )

    # -- after upload: the finisher's delete or move, and what memories.ai said about each video ---------------

    def due_action(self) -> Row | None:
        """The delivered row whose delete or move is due first; a row without a videoNo never has one."""
        found = self._read(
            "SELECT * FROM files INDEXED BY files_action WHERE action IS NOT NULL AND action_at <= ?"
            f" AND video_no IS NOT NULL AND state IN ({','.join('?' * len(DELIVERED))})"
            " ORDER BY action_at, id LIMIT 1",
            [self.clock(), *DELIVERED],
        )
        return Row.from_sql(found[0]) if found else None

    def next_action_at(self) -> float | None:
        found = self._read(
            "SELECT MIN(action_at) FROM files INDEXED BY files_action WHERE action IS NOT NULL"
            f" AND video_no IS NOT NULL AND state IN ({','.join('?' * len(DELIVERED))})",
            DELIVERED,
        )[0][0]
        return None if found is None else float(found)

    def action_done(self, row_id: int, moved_to: Path | None = None) -> None:
        """The delete or move is done, or nothing was left to do; moved_to is where a moved file is now."""
        now = self.clock()
        with self._write() as conn:
            conn.execute(
                "UPDATE files SET action = NULL, action_at = NULL, action_error = NULL, moved_to = ?, updated_at = ?"
                " WHERE id = ?",
                [None if moved_to is None else key(moved_to), now, row_id],
            )

    def action_failed(self, row_id: int, error: str, retry_at: float) -> None:
        """The delete or move failed: it stays to do, with why, and is tried again at retry_at."""
        with self._write() as conn:
            conn.execute(
                "UPDATE files SET action_error = ?, action_attempts = action_attempts + 1, action_at = ?,"
                " updated_at = ? WHERE id = ?",
                [error, retry_at, self.clock(), row_id],
            )

    def awaiting_index(self, video_nos: Iterable[str] | None = None) -> list[Row]:
        """Uploaded rows memories.ai has said nothing final about yet (of these videoNos), oldest upload first."""
        if video_nos is None:
            found = self._read(
                "SELECT * FROM files WHERE state = ? AND video_no IS NOT NULL ORDER BY uploaded_at, id", [UPLOADED]
            )
        else:
            numbers = list(video_nos)
            found = self._read(
                f"SELECT * FROM files WHERE state = ? AND video_no IN ({','.join('?' * len(numbers))})"
                " ORDER BY uploaded_at, id",
                [UPLOADED, *numbers],
            )
        return [Row.from_sql(r) for r in found]

    def mark_indexed(self, video_no: str, failure: str | None = None) -> list[Row]:
        """memories.ai is done with a video: `indexed`, or `index_failed` with the failure's cause as the error.

        Every row with that videoNo moves (a copy shares its original's), from `uploaded` or `index_failed` only.
        Returns the rows that changed: hearing again what is already recorded changes nothing.
        """
        state = INDEX_FAILED if failure else INDEXED
        now = self.clock()
        with self._write() as conn:
            ids = [
                found[0]
                for found in conn.execute(
                    "SELECT id FROM files WHERE video_no = ? AND state IN (?, ?) AND NOT (state = ? AND error IS ?)",
                    [video_no, UPLOADED, INDEX_FAILED, state, failure],
                )
            ]
            # Leaving index_failed drops the old cause; leaving uploaded keeps a note such as "same content as".
            for row_id in ids:
                self._move(
                    conn,
                    row_id,
                    state,
                    "error = CASE WHEN state = ? THEN ? ELSE COALESCE(?, error) END, indexed_at = ?, updated_at = ?",
                    [INDEX_FAILED, failure, failure, now, now],
                )
        return [self.get_id(row_id) for row_id in ids]
