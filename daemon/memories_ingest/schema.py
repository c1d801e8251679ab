"""What the ledger stores: a row, the pause and the learned pace, and the errors of a ledger that fails.

Paths are stored as raw bytes (``os.fsencode``), so a file name that is not UTF-8 is kept exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .files import Version

BUSY_TIMEOUT_MS = 15_000
PACE_KEY = "pace"
# A slot's spacing over 1/rate, for the jitter between the moment a slot begins and the moment the server
# counts the request.
MARGIN = 0.015
# The slowest pace a run of 0429s can bring: one upload every five minutes.
FLOOR_PER_SECOND = 1 / 300

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


@dataclass(frozen=True)
class Pace:
    """The learned upload pace, as the ledger keeps it. Rates are uploads per second; times are wall-clock."""

    rate: float
    # upload.rate_per_second, as the last process to change the pace had it.
    ceiling: float | None = None
    # The fastest pace a run of uploads proved to work, and the slowest a 0429 proved too fast.
    good: float | None = None
    too_fast: float | None = None
    accepted_in_a_row: int = 0
    settled_for: int = 0
    next_slot: float = 0.0
    # When the last upload went out, by the clock of the process that sent it.
    last_sent: float | None = None
    limited_at: float | None = None

    @property
    def interval(self) -> float:
        return (1.0 + MARGIN) / self.rate

    def describe(self) -> str:
        """The pace in words, for `status` and the status page."""
        pace = f"{self.rate:.3g} uploads/s (one every {self.interval:.3g} s)"
        if self.ceiling is None or self.rate >= self.ceiling:
            return f"{pace}, the configured ceiling"
        return f"{pace}, learned from the API's 0429 answers; the ceiling is {self.ceiling:.3g}/s"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, ceiling: float) -> Pace:
        if not isinstance(data, dict):
            return cls(rate=ceiling, ceiling=ceiling)
        known = {field.name for field in dataclasses.fields(cls)}
        pace = cls(**{key: value for key, value in data.items() if key in known})
        # A lower ceiling in the config applies at once; a higher one is reached by learning.
        return dataclasses.replace(pace, rate=min(ceiling, max(FLOOR_PER_SECOND, pace.rate)), ceiling=ceiling)

    @classmethod
    def stored(cls, data: Any) -> Pace | None:
        """The pace as the ledger has it, for a reader without the config (status, the page, metrics)."""
        if not isinstance(data, dict) or "rate" not in data:
            return None
        ceiling = data.get("ceiling") or data["rate"]
        return cls.from_json(data, float(ceiling))
