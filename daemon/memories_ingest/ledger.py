"""The ledger: one SQLite file that is both the upload queue and the record of what reached memories.ai.

Every state change is one ``BEGIN IMMEDIATE`` transaction, so two workers never claim the same row and
``status`` in another process always sees a consistent ledger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import sqlite3
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from .config import Folder, redact
from .files import Version
from .schema import (
    BUSY_TIMEOUT_MS,
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
    LedgerError,
    LedgerLocationError,
    Pause,
    Row,
    key,
    migrations,
)

__all__ = [
    "DELIVERED",
    "FAILED",
    "GONE",
    "INDEXED",
    "INDEX_FAILED",
    "PENDING",
    "QUEUED",
    "REJECTED",
    "RETRYING",
    "STATES",
    "UNCERTAIN",
    "UPLOADED",
    "UPLOADING",
    "Ledger",
    "LedgerError",
    "LedgerHeld",
    "LedgerLocationError",
    "LedgerLock",
    "Pause",
    "Row",
]


# A file in the ledger's directory that outlives the ledger: which ledger was here, and how much it had recorded.
MEMORY_NAME = ".memories-ingest-ledgers.json"
_JOURNAL_SUFFIXES = ("-wal", "-shm", "-journal")


def _keep_or_make_id(found: Any) -> tuple[Any, str]:
    made = found if isinstance(found, str) and found else uuid.uuid4().hex[:16]
    return made, made


def _set_aside_orphans(path: Path) -> list[Path]:
    """Move away the journal files of a ledger whose main file is gone, and return where they went."""
    moved = []
    for suffix in _JOURNAL_SUFFIXES:
        orphan = path.with_name(path.name + suffix)
        if orphan.exists():
            target = orphan.with_name(f"{orphan.name}.orphaned-{int(time.time())}")
            orphan.rename(target)
            moved.append(target)
    return moved


def remembered(ledger: Path) -> dict[str, Any] | None:
    """What the ledger's directory remembers of the ledger at this path."""
    try:
        memory = json.loads((ledger.parent / MEMORY_NAME).read_text())
        entry = memory.get(ledger.name) if isinstance(memory, dict) else None
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


def remember(ledger: Path, entry: dict[str, Any]) -> None:
    store = ledger.parent / MEMORY_NAME
    try:
        memory = json.loads(store.read_text())
    except (OSError, ValueError):
        memory = {}
    if not isinstance(memory, dict):
        memory = {}
    earlier = memory.get(ledger.name) or {}
    # The time alone moves on every call: it is written again only hourly, to spare SD cards.
    if {**earlier, "seen": 0} == {**entry, "seen": 0} and entry["seen"] - earlier.get("seen", 0) < 3600:
        return
    memory[ledger.name] = entry
    written = store.with_name(store.name + ".new")
    written.write_text(json.dumps(memory))
    written.replace(store)


def this_process() -> str:
    """This process, in a way no later process can share: its pid and its start time since boot."""
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def process_alive(owner: str | None) -> bool:
    """Whether the process a claim names still runs (and is the same process, not a new one with its pid)."""
    try:
        pid, started = (owner or "").split(":")
        return _start_time(int(pid)) == started
    except (ValueError, OSError):
        return False


def _start_time(pid: int) -> str:
    # Field 22 of /proc/PID/stat, counted after the command name, which may itself hold spaces and parentheses.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def location_problem(path: Path) -> str | None:
    """Why a ledger cannot live at path, or None. Tried for real (a file made and removed): root passes os.access."""
    directory = path.parent
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory, so the ledger's directory {directory} cannot be made"
    try:
        if existing == directory:
            with tempfile.TemporaryFile(dir=directory):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing))
    except OSError as error:
        if existing == directory:
            return (
                f"the ledger's directory {directory} is not writable by this user ({error.strerror}); "
                "the ledger needs it for its -wal and -shm files"
            )
        return f"the ledger's directory {directory} does not exist and cannot be made in {existing} ({error.strerror})"
    return None


class Ledger:
    def __init__(self, path: Path | str, *, create: bool = True, clock: Callable[[], float] = time.time) -> None:
        """Open the ledger at path. create=False (status, list) never makes one: a missing ledger is an error."""
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.RLock()
        # Journal files of a ledger that is no longer there: SQLite would replay them into a new one.
        self.orphans = _set_aside_orphans(self.path) if create and not self.path.exists() else []
        self._conn = self._connect(create)
        info = os.stat(self.path)
        self.identity = (info.st_dev, info.st_ino)
        self.db = Database(self._conn)
        try:
            self._migrate(create)
        except LedgerError:
            self._conn.close()
            raise
        except sqlite3.Error as error:
            self._conn.close()
            raise LedgerError(f"cannot prepare the ledger {self.path}: {error}") from None
        self.ledger_id: str = (
            self.update_setting("ledger_id", _keep_or_make_id) if create else self.setting("ledger_id")
        )

    def _migrate(self, create: bool) -> None:
        """Bring the schema up to date, in one transaction that waits its turn; a reader never writes.

        A reader (status, list) of a ledger the daemon has not migrated yet reads the columns that are there.
        """
        with self._lock:
            if not create and not self.db["files"].exists():
                raise LedgerError(f"the ledger {self.path} is still being made: ask again in a moment")
            if not create or not migrations.pending(self.db):
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                migrations.apply(self.db)
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def gone(self) -> str | None:
        """Why the file this ledger writes is no longer the one at its path, if it is not: deleted, or replaced."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return f"the ledger {self.path} was deleted while the daemon ran"
        except OSError as error:
            return f"the ledger {self.path} cannot be looked at: {error.strerror}"
        if (info.st_dev, info.st_ino) != self.identity:
            return f"the ledger {self.path} was replaced by another file while the daemon ran"
        return None

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

    def _connect(self, create: bool) -> sqlite3.Connection:
        if create:
            problem = location_problem(self.path)
            if problem is not None:
                raise LedgerLocationError(problem)
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif not self.path.is_file():
            raise LedgerError(
                f"there is no ledger at {self.path}: the daemon makes it when it first starts with this config"
            )
        try:
            conn = sqlite3.connect(
                f"file:{urllib.parse.quote(str(self.path))}?mode={'rwc' if create else 'rw'}",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
            conn.row_factory = sqlite3.Row
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except sqlite3.Error as error:
            raise LedgerError(f"cannot open the ledger {self.path}: {error}") from None
        if mode != "wal":
            conn.close()
            raise LedgerError(f"the ledger {self.path} cannot use WAL mode (got {mode})")
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise self._write_failed(error) from None
            try:
                yield self._conn
            except sqlite3.Error as error:
                self._rollback()
                raise self._write_failed(error) from None
            except BaseException:
                self._rollback()
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback()
                raise self._write_failed(error) from None

    def _write_failed(self, error: sqlite3.Error) -> LedgerError:
        return LedgerError(
            f"cannot write the ledger {self.path}: {error} (is the disk full, read-only or gone?); "
            "the last committed state is intact"
        )

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    def get(self, path: Path | str) -> Row | None:
        rows = self._read("SELECT * FROM files WHERE path = ?", [key(path)])
        return Row.from_sql(rows[0]) if rows else None

    def get_id(self, row_id: int) -> Row:
        return Row.from_sql(self._read("SELECT * FROM files WHERE id = ?", [row_id])[0])

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
            conn.execute(
                "UPDATE files SET size = ?, mtime_ns = ?, inode = ?, ctime_ns = ?, state = ?, prior_state = ?,"
                " stable_since = ?, unique_id = ?, folder = ?, next_attempt_at = NULL, updated_at = ?"
                " WHERE id = ?",
                [*version, PENDING, prior, now, unique_id, key(folder), now, found["id"]],
            )
            return True

    def known(self, folder: Path) -> dict[bytes, tuple[Version, str]]:
        """Every row under a folder, keyed by raw path: what a rescan compares the disk with."""
        rows = self._read(
            "SELECT path, size, mtime_ns, inode, ctime_ns, state FROM files WHERE folder = ?", [key(folder)]
        )
        return {r["path"]: (Version(r["size"], r["mtime_ns"], r["inode"], r["ctime_ns"]), r["state"]) for r in rows}

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
            cursor = conn.execute(
                "UPDATE files SET state = ?, prior_state = NULL, media = ?, video_no = NULL,"
                " sent_at = CASE WHEN fingerprint IS ? THEN sent_at ELSE NULL END, fingerprint = ?,"
                " uploaded_at = NULL, attempts = 0, read_errors = 0, error = NULL, next_attempt_at = ?,"
                " updated_at = ? WHERE id = ? AND state = ? AND size = ? AND mtime_ns = ? AND inode = ?"
                " AND ctime_ns IS ?",
                [QUEUED, json.dumps(media), fingerprint, fingerprint, now, now, row.id, PENDING, *row.version],
            )
            return cursor.rowcount == 1

    def mark_duplicate(self, row: Row, fingerprint: str, original: Row, *, action: str | None = None) -> None:
        """Same content as a delivered row: keep its videoNo instead of sending the bytes again.

        `action` (delete or move) is what the finisher then does with this file, as after an upload.
        """
        note = None if original.id == row.id else f"same content as {original.path}, already uploaded"
        state = original.prior_state if original.id == row.id else original.state
        now = self.clock()
        with self._write() as conn:
            conn.execute(
                "UPDATE files SET state = ?, prior_state = NULL, fingerprint = ?, video_no = ?, error = ?,"
                " uploaded_at = COALESCE(uploaded_at, ?), action = ?, action_at = ?, action_error = NULL,"
                " action_attempts = 0, moved_to = NULL, updated_at = ? WHERE id = ? AND state = ?",
                [state, fingerprint, original.video_no, note, original.uploaded_at, action, now, now, row.id, PENDING],
            )

    def mark_rejected(self, row_id: int, reason: str) -> None:
        self._finish(row_id, REJECTED, reason)

    def mark_gone(self, row_id: int, reason: str = "the file was deleted before it was uploaded") -> None:
        self._finish(row_id, GONE, reason)

    def _finish(self, row_id: int, state: str, reason: str | None) -> None:
        now = self.clock()
        with self._write() as conn:
            conn.execute(
                "UPDATE files SET state = ?, prior_state = NULL, error = ?, next_attempt_at = NULL, updated_at = ?,"
                " sent_at = CASE WHEN ? THEN NULL ELSE sent_at END WHERE id = ?",
                [state, reason and redact(reason), now, state == FAILED, row_id],
            )

    # -- uploading --------------------------------------------------------------------------------------

    def claim(self, folders: Iterable[Path]) -> Row | None:
        """Take the next due row for upload; the row is `uploading` when this returns it."""
        folder_keys = [key(f) for f in folders]
        if not folder_keys:
            return None
        now = self.clock()
        with self._write() as conn:
            found = conn.execute(
                f"SELECT * FROM files WHERE state IN ({','.join('?' * len(DUE))}) AND next_attempt_at <= ?"
                f" AND folder IN ({','.join('?' * len(folder_keys))}) ORDER BY next_attempt_at, id LIMIT 1",
                [*DUE, now, *folder_keys],
            ).fetchone()
            if found is None:
                return None
            conn.execute(
                "UPDATE files SET state = ?, attempts = attempts + 1, bytes_sent = 0, started_at = ?, updated_at = ?,"
                " claimed_by = ? WHERE id = ?",
                [UPLOADING, now, now, this_process(), found["id"]],
            )
        return self.get_id(found["id"])

    def claim_row(self, row_id: int) -> Row | None:
        """Take one particular row for upload, if it is queued or its retry is due (the `upload` command)."""
        now = self.clock()
        with self._write() as conn:
            claimed = conn.execute(
                "UPDATE files SET state = ?, attempts = attempts + 1, bytes_sent = 0, started_at = ?, updated_at = ?,"
                f" claimed_by = ? WHERE id = ? AND state IN ({','.join('?' * len(DUE))}) AND next_attempt_at <= ?",
                [UPLOADING, now, now, this_process(), row_id, *DUE, now],
            ).rowcount
        return self.get_id(row_id) if claimed else None

    def mark_uploaded(self, row: Row, video_no: str, note: str | None = None, *, action: str | None = None) -> None:
        """The server gave a videoNo. `action` (delete or move) is what the finisher then does with the file."""
        now = self.clock()
        with self._write() as conn:
            conn.execute(
                "UPDATE files SET state = ?, video_no = ?, error = ?, next_attempt_at = NULL, uploaded_at = ?,"
                " sent_at = NULL, action = ?, action_at = ?, action_error = NULL, action_attempts = 0,"
                " moved_to = NULL, updated_at = ? WHERE id = ?",
                [UPLOADED, video_no, note and redact(note), now, action, now, now, row.id],
            )
            conn.execute(
                "INSERT INTO uploads (file_id, path, unique_id, fingerprint, size, video_no, uploaded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [row.id, key(row.path), row.unique_id, row.fingerprint, row.size, video_no, now],
            )

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
            conn.execute(
                "UPDATE files SET folder = ?, unique_id = ?, size = ?, mtime_ns = ?, inode = ?, ctime_ns = ?,"
                " state = ?, prior_state = NULL, fingerprint = ?, video_no = ?, error = ?, sent_at = NULL,"
                " next_attempt_at = NULL, uploaded_at = ?, action = ?, action_at = ?, updated_at = ? WHERE id = ?",
                [
                    *(key(folder.path), folder.unique_id, *version, UPLOADED, content, video_no, note, now),
                    *(folder.action, now, now, row_id),
                ],
            )
            conn.execute(
                "INSERT INTO uploads (file_id, path, unique_id, fingerprint, size, video_no, uploaded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [row_id, key(path), folder.unique_id, content, version.size, video_no, now],
            )

    def mark_progress(self, row_id: int, bytes_sent: int) -> None:
        """How far the upload in flight is; written about once a second, so `status` can show it."""
        with self._write() as conn:
            conn.execute("UPDATE files SET bytes_sent = ? WHERE id = ?", [bytes_sent, row_id])

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
            conn.execute(
                "UPDATE files SET sent_at = CASE WHEN ? THEN NULL ELSE sent_at END, next_attempt_at = ?, error = ?,"
                " updated_at = ? WHERE id = ?",
                [answered, at, redact(error), now, row_id],
            )
            conn.execute(
                "UPDATE files SET state = CASE WHEN sent_at IS NULL THEN ? ELSE ? END WHERE id = ?",
                [RETRYING, UNCERTAIN, row_id],
            )

    def mark_uncertain(self, row_id: int, at: float, why: str, *, attempted: bool = False) -> None:
        """The upload may have landed, and list_videos cannot yet prove it either way: ask again at `at`.

        Asking is not an attempt at the upload, so it is not counted as one; a send that the API answered with a
        duplicate refusal is (attempted), so that its backoff grows.
        """
        now = self.clock()
        with self._write() as conn:
            conn.execute(
                "UPDATE files SET state = ?, sent_at = COALESCE(sent_at, ?), next_attempt_at = ?, error = ?,"
                " attempts = CASE WHEN ? THEN attempts ELSE MAX(attempts - 1, 0) END, updated_at = ? WHERE id = ?",
                [UNCERTAIN, now, at, redact(why), attempted, now, row_id],
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

    def mark_failed(self, row_id: int, error: str) -> None:
        self._finish(row_id, FAILED, error)

    def release(self, row_id: int, note: str | None = None) -> None:
        """Back to the queue, not counted as an attempt: the file was not at fault, and the attempt never landed."""
        now = self.clock()
        with self._write() as conn:
            conn.execute(
                "UPDATE files SET state = ?, attempts = MAX(attempts - 1, 0), next_attempt_at = ?, sent_at = NULL,"
                " error = COALESCE(?, error), updated_at = ? WHERE id = ? AND state = ?",
                [QUEUED, now, note and redact(note), now, row_id, UPLOADING],
            )

    def mark_changed(self, row_id: int) -> None:
        """The file changed under an upload: settle and validate it again."""
        now = self.clock()
        with self._write() as conn:
            conn.execute(
                "UPDATE files SET state = ?, attempts = MAX(attempts - 1, 0), stable_since = ?,"
                " error = 'the file changed during upload; waiting for it to settle', updated_at = ?"
                " WHERE id = ?",
                [PENDING, now, now, row_id],
            )

    def requeue_orphans(self) -> int:
        """Rows left `uploading` by a process that died (a daemon, an `upload`): back to the queue.

        A row whose body went out becomes `uncertain` instead. A row a live process is uploading is left alone.
        """
        now = self.clock()
        with self._write() as conn:
            orphans = [
                found["id"]
                for found in conn.execute("SELECT id, claimed_by FROM files WHERE state = ?", [UPLOADING])
                if not process_alive(found["claimed_by"])
            ]
            for row_id in orphans:
                conn.execute(
                    "UPDATE files SET state = CASE WHEN sent_at IS NULL THEN ? ELSE ? END, next_attempt_at = ?,"
                    " claimed_by = NULL, updated_at = ? WHERE id = ? AND state = ?",
                    [QUEUED, UNCERTAIN, now, now, row_id, UPLOADING],
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

    @staticmethod
    def _requeue(conn: sqlite3.Connection, row_id: int, now: float) -> None:
        conn.execute(
            "UPDATE files SET state = ?, prior_state = NULL, attempts = 0, read_errors = 0, next_attempt_at = ?,"
            " stable_since = ?, updated_at = ? WHERE id = ?",
            [PENDING, now, now, now, row_id],
        )

    # -- what status and list show ------------------------------------------------------------------------

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

    def due_count(self, folders: Iterable[Path]) -> int:
        """Rows in these folders with work to do now: settling, queued, in flight, or a retry that is due."""
        keys = [key(f) for f in folders]
        return int(
            self._read(
                f"SELECT COUNT(*) FROM files WHERE folder IN ({','.join('?' * len(keys))})"
                " AND (state IN (?, ?, ?) OR (state IN (?, ?) AND next_attempt_at <= ?))",
                [*keys, PENDING, QUEUED, UPLOADING, RETRYING, UNCERTAIN, self.clock()],
            )[0][0]
        )

    # -- settings: the pause, the pace and what the daemon publishes for `status` --------------------------

    def setting(self, name: str) -> Any:
        found = self._read("SELECT value FROM settings WHERE key = ?", [name])
        return json.loads(found[0][0]) if found else None

    def update_setting(self, name: str, apply: Callable[[Any], tuple[Any, Any]], *, durable: bool = True) -> Any:
        """Read, change and write one setting in one transaction; returns what apply returned besides the value.

        apply(value) gives (new value, result); a new value of None deletes the setting. durable=False skips
        the fsync, for state that may be lost with the power (the next upload slot), not with a crash.
        """
        with self._lock:
            if not durable:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._write() as conn:
                    found = conn.execute("SELECT value FROM settings WHERE key = ?", [name]).fetchone()
                    value, result = apply(json.loads(found[0]) if found else None)
                    if value is None:
                        conn.execute("DELETE FROM settings WHERE key = ?", [name])
                    else:
                        conn.execute(
                            "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", [name, json.dumps(value)]
                        )
            finally:
                if not durable:
                    self._conn.execute("PRAGMA synchronous=FULL")
        return result

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

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """One consistent view of the ledger for several reads (what `status` shows)."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield
            finally:
                self._conn.execute("COMMIT")

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
            conn.executemany(
                "UPDATE files SET state = ?, error = CASE WHEN state = ? THEN ? ELSE COALESCE(?, error) END,"
                " indexed_at = ?, updated_at = ? WHERE id = ?",
                [[state, INDEX_FAILED, failure, failure, now, now, row_id] for row_id in ids],
            )
        return [self.get_id(row_id) for row_id in ids]


# What `retry` can put back in the queue: what failed, was refused, waits, or went away.
RETRYABLE = (FAILED, REJECTED, RETRYING, UNCERTAIN, GONE)
LOCK_TRIES = 20
LOCK_TRY_SECONDS = 0.05


@dataclasses.dataclass(frozen=True)
class Holder:
    """The daemon that holds a ledger: its pid, and since when."""

    pid: int
    since: float


class LedgerHeld(Exception):
    """Another daemon holds this ledger."""

    def __init__(self, path: Path, holder: Holder | None) -> None:
        self.holder = holder
        who = f"the daemon with pid {holder.pid}" if holder else "another daemon"
        super().__init__(
            f"the ledger {path} is held by {who}: one daemon per ledger. Stop that one first, "
            "or give this one a ledger of its own"
        )


class LedgerLock:
    """A daemon's hold on its ledger: an flock on <ledger>.lock, which the kernel lets go when the process ends.

    `upload`, `status` and the other commands never take it; they share the ledger with the daemon.
    """

    def __init__(self, ledger: Path) -> None:
        self.path = ledger.with_name(ledger.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Hold the ledger; raises LedgerHeld, naming the holder, when another process does."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # `status` takes a shared lock for an instant to ask; a daemon holds it for its whole life.
        for _ in range(LOCK_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(LOCK_TRY_SECONDS)
        else:
            holder = _holder(fd)
            os.close(fd)
            raise LedgerHeld(self.path.with_suffix(""), holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def holder(ledger: Path) -> Holder | None:
        """Which daemon holds this ledger now, if one does; creates nothing."""
        try:
            fd = os.open(ledger.with_name(ledger.name + ".lock"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd) or Holder(pid=0, since=0.0)
        finally:
            os.close(fd)
        return None


def _holder(fd: int) -> Holder | None:
    try:
        found = json.loads(os.pread(fd, 4096, 0))
        return Holder(pid=int(found["pid"]), since=float(found["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
