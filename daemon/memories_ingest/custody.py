"""The ledger's custody: where it may live, which daemon holds it, whose claim a row is, and what its directory
remembers of the ledgers that kept its place before.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

# A file in the ledger's directory that outlives the ledger: which ledger was here, and how much it had recorded.
MEMORY_NAME = ".memories-ingest-ledgers.json"
_JOURNAL_SUFFIXES = ("-wal", "-shm", "-journal")


def set_aside_orphans(path: Path) -> list[Path]:
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
                # Not an idle wait: at most 1 s at start-up, before any worker or handler exists, while a
                # `status` lets go of its instant's shared lock. A stop signal meanwhile is counted, and the
                # daemon acts on it at its first turn.
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
