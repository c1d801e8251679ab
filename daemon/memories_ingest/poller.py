"""The poller: where inotify cannot see (network shares), new files are found through their directories' mtimes.

A name created, renamed in or removed moves its directory's mtime; writing into a file does not, and needs no
look from here: once recorded, a file's row is pending, and the settler stats every pending row until the file
holds still. So a pass stats each directory it knows (never a file) and lists only those whose mtime moved, and
what it keeps is one small entry per directory, not a snapshot of the tree. What no directory shows, a settled
file rewritten in place, the scanner's full reconcile finds every watch.rescan_seconds.

Like the watchdog handlers, the poller only records rows and returns; everything slow happens in the workers.
Symlinked directories are never entered here (the full scan follows them when watch.follow_symlinks says so).
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import structlog

from .config import Folder
from .names import is_ignored_name, is_video_name
from .states import GONE

if TYPE_CHECKING:
    from .recorder import Recorder

log = structlog.get_logger()

# A tree that takes long to look at is polled less often, so polling never keeps a disk or a share busy.
POLL_BUSY_RATIO = 4.0
# The coarsest clock a directory's mtime is kept to: FAT's 2 s (some SMB servers keep 1 s, NFS and local
# filesystems a clock tick). A name added within the same tick as a listing leaves the mtime as it was.
COARSEST_MTIME_NS = 2_000_000_000


class Listed(NamedTuple):
    """A directory as it was when it was last listed."""

    mtime_ns: int
    device: int
    inode: int
    # Whether its mtime was already a whole tick old then: if not, a name added just after the listing may not
    # have moved it, so the directory is listed again at the next pass.
    complete: bool

    @classmethod
    def of(cls, info: os.stat_result, looked_at_ns: int) -> Listed:
        complete = looked_at_ns - info.st_mtime_ns >= COARSEST_MTIME_NS
        return cls(info.st_mtime_ns, info.st_dev, info.st_ino, complete)

    def same_directory(self, info: os.stat_result) -> bool:
        return stat.S_ISDIR(info.st_mode) and (info.st_dev, info.st_ino) == (self.device, self.inode)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


class PolledFolder:
    """One folder's directories, each as it was last listed, and the pass that lists those that changed."""

    def __init__(self, folder: Folder, recorder: Recorder) -> None:
        """Learn the folder's directories; raises OSError when the folder cannot be looked at."""
        self.folder = folder
        self.recorder = recorder
        self.root = str(folder.path)
        self.directories: dict[str, Listed] = {}
        # False once the folder itself is gone or replaced: the watcher then gives up the watch and rewatches.
        self.running = True
        looked_at_ns = time.time_ns()
        info = os.lstat(self.root)
        if not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(f"{self.root} is not a directory")
        # The full scan that follows every new watch records the files that are here now.
        self._list_tree(self.root, info, looked_at_ns, record=False)

    def poll(self) -> int:
        """Stat every directory known, list those that changed; returns how many directories it listed."""
        looked_at_ns = time.time_ns()
        listed = 0
        for path, before in list(self.directories.items()):
            if path not in self.directories:
                continue  # forgotten earlier in this pass, with a parent that went
            try:
                info: os.stat_result | None = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                info = None
            except OSError:
                continue  # a share that does not answer now: look again at the next pass; the full scan reports it
            if info is not None and before.same_directory(info):
                if info.st_mtime_ns != before.mtime_ns or not before.complete:
                    listed += self._list_tree(path, info, looked_at_ns, record=True)
                continue
            self._forget(path)
            if path == self.root:
                self.running = False
                return listed
            if info is not None and stat.S_ISDIR(info.st_mode):
                # Replaced by another directory: its parent may have been listed already in this pass.
                listed += self._list_tree(path, info, looked_at_ns, record=True)
        return listed

    def _list_tree(self, top: str, info: os.stat_result, looked_at_ns: int, *, record: bool) -> int:
        """List a directory and every directory under it not seen before; returns how many it listed."""
        todo = [(top, info)]
        listed = 0
        while todo:
            path, found = todo.pop()
            self.directories[path] = Listed.of(found, looked_at_ns)
            try:
                with os.scandir(path) as listing:
                    entries = [entry for entry in listing if not is_ignored_name(entry.name)]
            except OSError as error:
                log.warning("cannot list a directory", path=path, error=error.strerror)
                continue
            listed += 1
            if record:
                self._record_new(path, entries)
            if self.folder.recursive:
                todo += self._new_directories(entries)
        return listed

    def _record_new(self, directory: str, entries: list[os.DirEntry[str]]) -> None:
        """Record the files the ledger does not know as they are; the settler looks after the rest."""
        known = self.recorder.ledger.known_in(directory)
        for entry in entries:
            if not is_video_name(entry.name) or not _is_file(entry):
                continue
            found = known.get(os.fsencode(entry.path))
            # The listing's inode costs no stat, and tells a file renamed over a known one.
            if found is None or found[1] == GONE or found[0] != entry.inode():
                self.recorder.record(Path(entry.path), folder=self.folder)

    def _new_directories(self, entries: list[os.DirEntry[str]]) -> list[tuple[str, os.stat_result]]:
        found = []
        for entry in entries:
            if entry.path in self.directories or not _is_dir(entry):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not self._inside_itself(entry.path, info):
                found.append((entry.path, info))
        return found

    def _inside_itself(self, path: str, info: os.stat_result) -> bool:
        """Whether a directory is one of its own parents (a bind mount): listing into it would never end."""
        parent = os.path.dirname(path)
        while parent in self.directories:
            if self.directories[parent].same_directory(info):
                return True
            parent = os.path.dirname(parent)
        return False

    def _forget(self, path: str) -> None:
        under = path + os.sep
        for gone in [known for known in self.directories if known == path or known.startswith(under)]:
            del self.directories[gone]


class Poller(threading.Thread):
    """Every polled folder, one pass each poll_seconds, on one thread: where watchdog's PollingObserver was."""

    def __init__(self, recorder: Recorder, rescan: Callable[[Path | None], None], poll_seconds: float) -> None:
        super().__init__(name="poller", daemon=True)
        self.recorder = recorder
        self.rescan = rescan
        self.poll_seconds = poll_seconds
        self.folders: dict[Path, PolledFolder] = {}
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    def schedule(self, folder: Folder) -> None:
        """Poll a folder from the next pass on; raises OSError when it cannot be looked at."""
        polled = PolledFolder(folder, self.recorder)
        with self._lock:
            self.folders[folder.path] = polled

    def unschedule(self, path: Path) -> None:
        """Stop polling a folder; raises KeyError when it is not polled."""
        with self._lock:
            del self.folders[path]

    def polls(self, path: Path) -> bool:
        """Whether the folder is polled, and was still there at the last pass."""
        polled = self.folders.get(path)
        return polled is not None and polled.running

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        wait = self.poll_seconds
        while not self.stopping.wait(wait):
            started = time.monotonic()
            self.poll()
            wait = max(self.poll_seconds, (time.monotonic() - started) * POLL_BUSY_RATIO)

    def poll(self) -> int:
        """One pass over every folder; returns how many directories it listed."""
        with self._lock:
            folders = [polled for polled in self.folders.values() if polled.running]
        listed = 0
        for polled in folders:
            try:
                listed += polled.poll()
            except Exception:
                log.exception("polling failed; rescanning the folder", path=polled.root)
                self.rescan(polled.folder.path)
        return listed
