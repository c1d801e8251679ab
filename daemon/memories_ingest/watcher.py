"""Seeing files arrive: watchdog observers for the moment they appear, and a full scan to reconcile.

Event handlers only record a row and return. Everything slow (settling, probing, uploading) happens in the
workers, so a burst of events never backs up the observer's queue.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from .config import Config, Folder
from .ledger import GONE, PENDING, QUEUED, RETRYING, Ledger

log = structlog.get_logger()

IGNORED_PATTERNS = ("*.part", "*.tmp", "*.crdownload", "~*", "*~", ".*")


def is_ignored_name(name: str) -> bool:
    """Hidden files and the names that downloaders, editors and copy tools give unfinished files."""
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern) for pattern in IGNORED_PATTERNS)


def walk(folder: Folder, root: Path | None = None) -> Iterator[tuple[Path, os.stat_result]]:
    """Every regular file under root (the whole folder by default), never following a symlink or opening a file."""
    pending = [str(root or folder.path)]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as error:
            log.warning("cannot list a directory", path=directory, error=error.strerror)
            continue
        for entry in entries:
            if is_ignored_name(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                if folder.recursive:
                    pending.append(entry.path)
            elif stat.S_ISREG(info.st_mode):
                yield Path(entry.path), info


class Recorder:
    """Puts what the watcher and the scanner see into the ledger, and wakes the settler."""

    def __init__(self, config: Config, ledger: Ledger, wake: threading.Event) -> None:
        self.config = config
        self.ledger = ledger
        self.wake = wake

    def record(self, path: Path, info: os.stat_result | None = None, folder: Folder | None = None) -> bool:
        folder = folder or self.config.folder_for(path)
        if folder is None or is_ignored_name(path.name):
            return False
        if info is None:
            try:
                info = os.stat(path, follow_symlinks=False)
            except OSError:
                return False
            if not stat.S_ISREG(info.st_mode):
                return False
        changed = self.ledger.record_seen(
            path, folder.path, folder.unique_id, info.st_size, info.st_mtime_ns, info.st_ino
        )
        if changed:
            self.wake.set()
        return changed

    def scan(self, folder: Folder, root: Path | None = None) -> int:
        """Reconcile a folder, or one directory in it, with the ledger; returns how many files were new or changed."""
        known = self.ledger.known(folder.path)
        changed = 0
        for path, info in walk(folder, root):
            key = os.fsencode(path)
            found = known.pop(key, None)
            if found is not None and found[:3] == (info.st_size, info.st_mtime_ns, info.st_ino) and found[3] != GONE:
                continue
            if self.record(path, info, folder):
                changed += 1
        if root in (None, folder.path) and folder.path.is_dir():
            self._forget_missing(known)
        return changed

    def _forget_missing(self, missing: dict[bytes, tuple[int, int, int, str]]) -> None:
        for key, (_, _, _, state) in missing.items():
            if state in (PENDING, QUEUED, RETRYING):
                row = self.ledger.get(os.fsdecode(key))
                if row is not None and row.state == state:
                    self.ledger.mark_gone(row.id)
                    log.info("file gone before upload", path=str(row.path), unique_id=row.unique_id, state=GONE)


class _Handler(FileSystemEventHandler):
    def __init__(self, recorder: Recorder, folder: Folder, rescan: Callable[[Path], None]) -> None:
        self.recorder = recorder
        self.folder = folder
        self.rescan = rescan

    def _seen(self, raw: bytes | str, is_directory: bool) -> None:
        path = Path(os.fsdecode(raw))
        if is_directory:
            if path != self.folder.path and self.folder.recursive:
                self.rescan(path)
            return
        if self.folder.contains(path):
            self.recorder.record(path, folder=self.folder)

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            if event.event_type in ("created", "modified", "closed"):
                self._seen(event.src_path, event.is_directory)
            elif event.event_type == "moved":
                self._seen(event.dest_path, event.is_directory)
            elif event.event_type == "deleted" and event.is_directory:
                self.rescan(self.folder.path)
        except Exception:
            log.exception("event handling failed; a rescan will catch up", path=os.fsdecode(event.src_path))
            self.rescan(self.folder.path)


class Watcher:
    """One observer for every folder; polling where inotify cannot see (NFS, SMB) or where config says so."""

    def __init__(self, config: Config, recorder: Recorder, rescan: Callable[[Path], None]) -> None:
        self.config = config
        self.recorder = recorder
        self.rescan = rescan
        self.observer: BaseObserver = PollingObserver(timeout=2) if config.watch.polling is True else Observer()
        self.watched: set[Path] = set()

    def start(self) -> None:
        self.refresh()
        self.observer.start()

    def refresh(self) -> None:
        """Watch every folder that exists now; one that appears later is picked up by the next call."""
        for folder in self.config.folders:
            if folder.path in self.watched or not folder.path.is_dir():
                continue
            try:
                self.observer.schedule(
                    _Handler(self.recorder, folder, self.rescan), str(folder.path), recursive=folder.recursive
                )
            except OSError as error:
                log.error(
                    "cannot watch a folder; the rescan still covers it",
                    path=str(folder.path),
                    error=str(error),
                )
                continue
            self.watched.add(folder.path)
            log.info("watching", path=str(folder.path), unique_id=folder.unique_id, recursive=folder.recursive)

    def stop(self) -> None:
        self.observer.stop()
        if self.observer.is_alive():
            self.observer.join(timeout=5)
