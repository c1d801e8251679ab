"""The ledger's SQLite file: opening it, its transactions, its settings, and the one way a file changes state.

Every state change is one ``BEGIN IMMEDIATE`` transaction, so two workers never claim the same row and a
`status` in another process always sees a consistent ledger; and it goes through the table of states.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .custody import location_problem, set_aside_orphans
from .schema import BUSY_TIMEOUT_MS, LedgerError, LedgerLocationError, Row, key
from .states import State, check


def _keep_or_make_id(found: Any) -> tuple[Any, str]:
    made = found if isinstance(found, str) and found else uuid.uuid4().hex[:16]
    return made, made


class Store:
    """The ledger's file and its transactions; Ledger adds what is kept in it."""

    def __init__(self, path: Path | str, *, create: bool = True, clock: Callable[[], float] = time.time) -> None:
        """Open the ledger at path. create=False (status, list) never makes one: a missing ledger is an error."""
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.RLock()
        # Journal files of a ledger that is no longer there: SQLite would replay them into a new one.
        self.orphans = set_aside_orphans(self.path) if create and not self.path.exists() else []
        self._conn = self._connect(create)
        info = os.stat(self.path)
        self.identity = (info.st_dev, info.st_ino)
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
            if not create:
                made = self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'files'")
                if made.fetchone() is None:
                    raise LedgerError(f"the ledger {self.path} is still being made: ask again in a moment")
                return
            # Here, not at the top: only a writer migrates, and sqlite-utils would cost `status` more than its answer.
            from . import migrations

            if not migrations.pending(self._conn):
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                migrations.apply(self._conn)
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

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """One consistent view of the ledger for several reads (what `status` shows)."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield
            finally:
                self._conn.execute("COMMIT")

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

    def _move(
        self,
        conn: sqlite3.Connection,
        row_id: int,
        to: State,
        assignments: str = "",
        params: Sequence[Any] = (),
        *,
        only_from: Collection[str] | None = None,
        guard: str = "",
        guard_params: Sequence[Any] = (),
    ) -> bool:
        """Change one row's state, and other columns with it, as the table of states allows; in conn's transaction.

        only_from and guard say which rows the operation is for: one found otherwise (it moved on meanwhile) is left
        as it is, and False is returned. A change the table does not allow raises IllegalChange, and the
        transaction is rolled back.
        """
        found = conn.execute(
            f"SELECT state FROM files WHERE id = ?{' AND ' + guard if guard else ''}", [row_id, *guard_params]
        ).fetchone()
        if found is None or (only_from is not None and found[0] not in only_from):
            return False
        check(found[0], to)
        conn.execute(
            f"UPDATE files SET state = ?{', ' + assignments if assignments else ''} WHERE id = ?", [to, *params, row_id]
        )
        return True
