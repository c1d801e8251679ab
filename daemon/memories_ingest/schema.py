"""What the ledger stores: the table layout and its migrations, and a row.

Paths are stored as raw bytes (``os.fsencode``), so a file name that is not UTF-8 is kept exactly.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sqlite_utils import Database, Migrations

from .files import Version

BUSY_TIMEOUT_MS = 15_000

migrations = Migrations("memories_ingest")


@migrations()
def create_files(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE files (
            id INTEGER PRIMARY KEY,
            path BLOB NOT NULL UNIQUE,
            folder BLOB NOT NULL,
            unique_id TEXT,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            inode INTEGER NOT NULL,
            fingerprint TEXT,
            state TEXT NOT NULL,
            prior_state TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL,
            stable_since REAL NOT NULL,
            video_no TEXT,
            error TEXT,
            media TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            uploaded_at REAL
        )
        """
    )
    db.execute("CREATE INDEX files_state ON files (state, next_attempt_at)")
    db.execute("CREATE INDEX files_folder ON files (folder)")
    db.execute("CREATE INDEX files_content ON files (unique_id, fingerprint)")
    db.execute(
        """
        CREATE TABLE uploads (
            id INTEGER PRIMARY KEY,
            file_id INTEGER NOT NULL REFERENCES files (id),
            path BLOB NOT NULL,
            unique_id TEXT,
            fingerprint TEXT,
            size INTEGER NOT NULL,
            video_no TEXT NOT NULL,
            uploaded_at REAL NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX uploads_time ON uploads (uploaded_at)")
    db.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


@migrations()
def add_sent_at(db: Database) -> None:
    """When the last byte of an upload was handed to the socket: until an answer is stored, it is uncertain."""
    db.execute("ALTER TABLE files ADD COLUMN sent_at REAL")


@migrations()
def add_progress_and_actions(db: Database) -> None:
    """Upload progress that `status` in another process can read, and after-upload actions still to do."""
    db.execute("ALTER TABLE files ADD COLUMN bytes_sent INTEGER")
    db.execute("ALTER TABLE files ADD COLUMN started_at REAL")
    db.execute("ALTER TABLE files ADD COLUMN action TEXT")
    db.execute("ALTER TABLE files ADD COLUMN indexed_at REAL")


@migrations()
def add_action_outcome(db: Database) -> None:
    """Where a moved file went, and why an after-upload action still waits: it is retried, never dropped.

    Indexing results arrive by videoNo, one callback per video, so that lookup gets an index.
    """
    db.execute("ALTER TABLE files ADD COLUMN moved_to BLOB")
    db.execute("ALTER TABLE files ADD COLUMN action_error TEXT")
    db.execute("ALTER TABLE files ADD COLUMN action_attempts INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE files ADD COLUMN action_at REAL")
    db.execute("CREATE INDEX files_video_no ON files (video_no)")


@migrations()
def index_actions(db: Database) -> None:
    """The finisher asks every second what is due; without this it would read every delivered row to answer."""
    db.execute("UPDATE files SET action_at = 0 WHERE action IS NOT NULL AND action_at IS NULL")
    db.execute("CREATE INDEX files_action ON files (action_at) WHERE action IS NOT NULL")


@migrations()
def add_ctime_and_read_errors(db: Database) -> None:
    """The ctime joins every same-file check: a rewrite that restores the mtime, or a chmod, changes only it.

    A file that cannot be read yet (a permission, an I/O error) is checked again with backoff; the row counts how
    often. Rows from before keep a NULL ctime until they are next seen, and are not changed by that.
    """
    db.execute("ALTER TABLE files ADD COLUMN ctime_ns INTEGER")
    db.execute("ALTER TABLE files ADD COLUMN read_errors INTEGER NOT NULL DEFAULT 0")


@migrations()
def add_claimed_by(db: Database) -> None:
    """Which process is uploading a row: a daemon starting up requeues only the rows of processes that died.

    `upload` shares the ledger with the daemon, so an `uploading` row may well be another live process's.
    """
    db.execute("ALTER TABLE files ADD COLUMN claimed_by TEXT")


_UNSET: dict[str, Any] = {"action_attempts": 0, "read_errors": 0}


class LedgerError(Exception):
    """The ledger cannot be opened or written; the message says what to fix."""


class LedgerLocationError(LedgerError):
    """The ledger cannot be made where the config puts it: a problem of the config, not of the ledger."""


@dataclass(frozen=True)
class Row:
    id: int
    path: Path
    folder: Path
    unique_id: str | None
    size: int
    mtime_ns: int
    inode: int
    fingerprint: str | None
    state: str
    prior_state: str | None
    attempts: int
    next_attempt_at: float | None
    stable_since: float
    video_no: str | None
    error: str | None
    media: dict[str, Any] | None
    created_at: float
    updated_at: float
    uploaded_at: float | None
    sent_at: float | None
    bytes_sent: int | None
    started_at: float | None
    action: str | None
    indexed_at: float | None
    moved_to: Path | None
    action_error: str | None
    action_attempts: int
    action_at: float | None
    ctime_ns: int | None
    read_errors: int
    claimed_by: str | None

    @property
    def version(self) -> Version:
        return Version(self.size, self.mtime_ns, self.inode, self.ctime_ns)

    @classmethod
    def from_sql(cls, record: sqlite3.Row) -> Row:
        # A reader of a ledger whose schema the daemon has not brought up to date yet: what is not there is unset.
        present = set(record.keys())
        values: dict[str, Any] = {
            f.name: record[f.name] if f.name in present else _UNSET.get(f.name) for f in fields(cls)
        }
        values["path"] = Path(os.fsdecode(values["path"]))
        values["folder"] = Path(os.fsdecode(values["folder"]))
        values["media"] = json.loads(values["media"]) if values["media"] else None
        values["moved_to"] = Path(os.fsdecode(values["moved_to"])) if values["moved_to"] else None
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["path"] = str(self.path)
        data["folder"] = str(self.folder)
        data["moved_to"] = str(self.moved_to) if self.moved_to else None
        return data


@dataclass(frozen=True)
class Pause:
    """Why every upload waits, and when the daemon next tries.

    kind is `account` (the account refused uploads; cause says why), `indexing_window`, or `ledger` (a new
    ledger where an earlier one was). key_id is the fingerprint of the key that was refused, so that a new key
    lifts a pause the old one caused. until None: until a person lifts it (`memories-ingest resume`).
    """

    reason: str
    since: float
    until: float | None
    kind: str
    cause: str | None = None
    key_id: str | None = None

    def remaining(self, now: float) -> float:
        return float("inf") if self.until is None else self.until - now

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Pause:
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in data.items() if name in known})


def key(path: Path | str) -> bytes:
    return os.fsencode(path)
