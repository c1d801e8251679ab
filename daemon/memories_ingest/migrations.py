"""The ledger's table layout, as the migrations that build it: each runs once, in order, in one transaction.

Only a process that writes the ledger loads this (and sqlite-utils): `status` and `list` read what is there.
"""

from __future__ import annotations

import sqlite3

from sqlite_utils import Database, Migrations

migrations = Migrations("memories_ingest")


def pending(conn: sqlite3.Connection) -> bool:
    return bool(migrations.pending(Database(conn)))


def apply(conn: sqlite3.Connection) -> None:
    """Run every pending migration, inside the transaction the caller holds."""
    migrations.apply(Database(conn))


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
