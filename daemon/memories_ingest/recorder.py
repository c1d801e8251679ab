"""Recording what the observers, the poller and the scans find: one ledger row per file, and nothing slower.

Every way a file is found (an inotify event, a poll, a reconcile scan) ends in Recorder.record or
Recorder.scan, which compare what is on disk with what the ledger knows and write only the difference.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import structlog

from .config import Config, Folder
from .files import Version, symlink_between
from .ledger import Ledger
from .names import is_ignored_name, is_video_name
from .states import GONE, PENDING, QUEUED, RETRYING

log = structlog.get_logger()


def walk(
    folder: Folder, root: Path | None = None, *, follow_symlinks: bool = False
) -> Iterator[tuple[str, os.stat_result]]:
    """Every regular file under root (the whole folder by default), without opening a file.

    A symlinked file is never followed. A symlinked directory is followed only with follow_symlinks, and each
    directory is listed once, so a link (or a bind mount) back up the tree cannot loop.
    """
    top = root or folder.path
    if not follow_symlinks and top != folder.path and symlink_between(folder.path, top):
        return
    try:
        info = os.stat(top)
    except OSError as error:
        log.warning("cannot list a directory", path=str(top), error=error.strerror)
        return
    visited = {(info.st_dev, info.st_ino)}
    pending = [str(top)]
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
                if follow_symlinks and folder.recursive and stat.S_ISLNK(info.st_mode):
                    info = os.stat(entry.path)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and not entry.is_symlink():
                yield entry.path, info
            elif stat.S_ISDIR(info.st_mode) and folder.recursive and (info.st_dev, info.st_ino) not in visited:
                visited.add((info.st_dev, info.st_ino))
                pending.append(entry.path)


class Recorder:
    """Puts what the watcher and the scanner see into the ledger, and wakes the settler."""

    def __init__(self, config: Config, ledger: Ledger, wake: threading.Event) -> None:
        self.config = config
        self.ledger = ledger
        self.wake = wake
        # Per folder, how many files without a video extension its last full scan passed over.
        self.ignored: dict[Path, int] = {}

    def record(self, path: Path, info: os.stat_result | None = None, folder: Folder | None = None) -> bool:
        folder = folder or self.config.folder_for(path)
        if folder is None or is_ignored_name(path.name) or not is_video_name(path.name):
            return False
        if info is None:
            try:
                info = os.stat(path, follow_symlinks=False)
            except OSError:
                return False
            if not stat.S_ISREG(info.st_mode):
                return False
        changed = self.ledger.record_seen(path, folder.path, folder.unique_id, Version.of(info))
        if changed:
            self.wake.set()
        return changed

    def scan(self, folder: Folder, root: Path | None = None) -> int:
        """Reconcile a folder, or one directory in it, with the ledger; returns how many files were new or changed."""
        known = self.ledger.known(folder.path)
        changed = ignored = 0
        for path, info in walk(folder, root, follow_symlinks=self.config.watch.follow_symlinks):
            if not is_video_name(path):
                ignored += 1
                continue
            found = known.pop(os.fsencode(path), None)
            if found is not None and found[0] == Version.of(info) and found[1] != GONE:
                continue
            if self.record(Path(path), info, folder):
                changed += 1
        if root in (None, folder.path) and folder.path.is_dir():
            self.ignored[folder.path] = ignored
            self._forget_missing(known)
        return changed

    def _forget_missing(self, missing: dict[bytes, tuple[Version, str]]) -> None:
        for key, (_, state) in missing.items():
            if state in (PENDING, QUEUED, RETRYING):
                row = self.ledger.get(os.fsdecode(key))
                if row is not None and row.state == state:
                    self.ledger.mark_gone(row.id, only_from=(state,))
                    log.info("file gone before upload", path=str(row.path), unique_id=row.unique_id, state=GONE)
