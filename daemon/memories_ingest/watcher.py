"""Seeing files arrive: watchdog's inotify observer or the poller for the moment they appear, and a full scan.

Event handlers and the poller only record a row and return. Everything slow (settling, probing, uploading)
happens in the workers, so a burst of events never backs up the observer's queue.

Watching must never go silent. Each folder is watched by inotify, or polled where inotify cannot see (network
filesystems), where the config says so, or where the kernel's inotify limits are reached. Whenever events may
have been lost (a queue overflow, a handler that failed, an observer or a watch that stopped), the watcher asks
for a rescan rather than trusting what it saw.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver, ObservedWatch

from .config import Config, Folder
from .files import symlink_between
from .mounts import NETWORK_FILESYSTEMS, mount_for, parse_mountinfo, read_mountinfo
from .poller import Poller
from .recorder import Recorder

log = structlog.get_logger()

INOTIFY = "inotify"
POLLING = "polling"
INOTIFY_LIMITS = (errno.ENOSPC, errno.EMFILE)
INOTIFY_SYSCTLS = Path("/proc/sys/fs/inotify")


def watch_mode(path: Path, polling: bool | str, mountinfo: bytes) -> tuple[str, str]:
    """inotify or polling for a folder under the `watch.polling` setting, and why, in words for the log."""
    if polling is True:
        return POLLING, "watch.polling is true"
    if polling is False:
        return INOTIFY, "watch.polling is false"
    mount = mount_for(path, parse_mountinfo(mountinfo))
    if mount is None:
        return INOTIFY, "its filesystem is unknown"
    if mount.fstype in NETWORK_FILESYSTEMS:
        return POLLING, f"it is on {mount.fstype} ({mount.source}), a network filesystem inotify does not see into"
    return INOTIFY, f"it is on {mount.fstype}, a local filesystem"


def raise_limit_command(name: str, floor: int) -> str:
    """The command that raises an inotify limit: to double what it is now, and at least to floor."""
    try:
        current = int((INOTIFY_SYSCTLS / name).read_text())
    except (OSError, ValueError):
        current = 0
    return f"sysctl fs.inotify.{name}={max(floor, current * 2)} (and the same in /etc/sysctl.d/ to keep it)"


class _Handler(FileSystemEventHandler):
    def __init__(
        self, recorder: Recorder, folder: Folder, rescan: Callable[[Path | None], None], follow_symlinks: bool
    ) -> None:
        self.recorder = recorder
        self.folder = folder
        self.rescan = rescan
        self.follow_symlinks = follow_symlinks

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._handle(event)
        except Exception:
            log.exception("event handling failed; rescanning the folder", path=os.fsdecode(event.src_path))
            self.rescan(self.folder.path)

    def _handle(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if kind == "deleted" and event.is_directory:
            self.rescan(self.folder.path)
        if kind not in ("created", "modified", "closed", "moved"):
            return
        path = Path(os.fsdecode(event.dest_path if kind == "moved" else event.src_path))
        if path == self.folder.path or not self.folder.contains(path):
            return
        # inotify keeps a watch on a directory moved out of the tree under its old path, so without this check a
        # symlink put in its place would let its files in.
        if not self.follow_symlinks and symlink_between(self.folder.path, path.parent):
            return
        if not event.is_directory:
            self.recorder.record(path, folder=self.folder)
        elif self.folder.recursive and kind in ("created", "moved"):
            self.rescan(path)


if sys.platform == "linux":
    from watchdog.observers.inotify import InotifyEmitter
    from watchdog.observers.inotify_c import (
        CallbackId,
        InotifyEvent,
        InotifyFD,
        Mask,
        WatchCallback,
        WatchDescriptor,
    )

    class _InotifyReader(InotifyFD):
        """watchdog's inotify reader, telling the watcher when the kernel dropped events or refused a watch.

        watchdog rebuilds its watches after a queue overflow but reports nothing, and skips a subdirectory the
        kernel refuses to watch (ENOSPC) without a word; both mean events are lost.
        """

        def __init__(self, overflowed: Callable[[], None]) -> None:
            super().__init__()
            self.overflowed = overflowed
            self.refused: queue.SimpleQueue[tuple[bytes, OSError]] = queue.SimpleQueue()

        def add_callback(self, path: bytes, mask: Mask, callback: WatchCallback, id_: CallbackId) -> WatchDescriptor:
            try:
                return super().add_callback(path, mask, callback, id_)
            except OSError as error:
                if error.errno in INOTIFY_LIMITS:
                    self.refused.put((path, error))
                raise

        def handle_event(self, event: InotifyEvent) -> None:
            super().handle_event(event)
            if event.is_queue_overflow:
                self.overflowed()

    class _InotifyObserver(BaseObserver):
        """watchdog's InotifyObserver, with a reader of its own that the watcher can hear from."""

        def __init__(self, overflowed: Callable[[], None]) -> None:
            self.reader = _InotifyReader(overflowed)
            self.reader.start()
            super().__init__(InotifyEmitter, timeout=DEFAULT_OBSERVER_TIMEOUT, inotify_fd=self.reader)

        def on_thread_stop(self) -> None:
            super().on_thread_stop()
            self.reader.stop()
            self.reader.join()


def _running(observer: BaseObserver | Poller) -> bool:
    if sys.platform == "linux" and isinstance(observer, _InotifyObserver):
        return observer.is_alive() and observer.reader.is_alive()
    return observer.is_alive()


@dataclass
class Watch:
    """One folder scheduled on one observer, and the directory it was when it was scheduled."""

    folder: Folder
    mode: str
    observer: BaseObserver | Poller
    # watchdog's name for the watch; None on the poller, which knows its folders by path.
    observed: ObservedWatch | None
    identity: tuple[int, int]

    def running(self) -> bool:
        if isinstance(self.observer, Poller):
            return self.observer.polls(self.folder.path)
        return any(emitter.watch == self.observed and emitter.is_alive() for emitter in list(self.observer.emitters))

    def cancel(self) -> None:
        """Stop watching; raises KeyError when the observer no longer has the watch."""
        if isinstance(self.observer, Poller):
            self.observer.unschedule(self.folder.path)
        elif self.observed is not None:
            self.observer.unschedule(self.observed)


class Watcher:
    """Every folder on one of two observers, inotify or polling, supervised so that watching never goes silent.

    refresh() (the scanner calls it before each full scan) does the file system work: it watches folders that
    appeared, and watches again a folder whose directory was replaced or remounted. supervise() (the daemon's
    main loop calls it several times a second) only looks at threads: it restarts a dead observer, gives up a watch that
    stopped, and asks for the rescans that catch up. health() says what is wrong, if anything.
    """

    def __init__(self, config: Config, recorder: Recorder, rescan: Callable[[Path | None], None]) -> None:
        self.config = config
        self.recorder = recorder
        self.rescan = rescan
        self.observers: dict[str, BaseObserver | Poller] = {}
        self.watches: dict[Path, Watch] = {}
        # Why each watched folder is watched the way it is, for the log and `status`.
        self.reasons: dict[Path, str] = {}
        self.unwatched: dict[Path, str] = {}
        self.inotify_refused: dict[Path, str] = {}
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Watch every folder that exists now, as the directory it is now; the caller rescans after."""
        with self._lock:
            if self._stopped:
                return
            self._replace_dead_observers()
            self._drop_stopped_watches()
            self._apply_refusals()
            for folder in self.config.folders:
                self._refresh_folder(folder)
            while moved := self._apply_refusals():
                for folder in moved:
                    self._refresh_folder(folder)

    def supervise(self) -> None:
        """Restart dead observers, give up stopped watches, and ask for rescans; never lists or stats a directory."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._stopped:
                return
            restarted = self._replace_dead_observers()
            stopped = self._drop_stopped_watches()
            refused = self._apply_refusals()
        finally:
            self._lock.release()
        if restarted or refused:
            self.rescan(None)
        for folder in stopped:
            self.rescan(folder.path)

    def health(self) -> list[str]:
        """What is wrong with watching now, one line each; empty when every folder is watched as it should be."""
        problems = [
            f"the {mode} observer is not running" for mode, o in list(self.observers.items()) if not _running(o)
        ]
        problems += [f"{path}: its watch stopped" for path, watch in list(self.watches.items()) if not watch.running()]
        problems += [f"{path}: not watched: {why}" for path, why in list(self.unwatched.items())]
        problems += [
            f"{path}: polled, not watched by inotify: {why}" for path, why in list(self.inotify_refused.items())
        ]
        return problems

    def describe(self) -> list[dict[str, str | None]]:
        """Each folder of the config: how it is watched now, and why (for `status`)."""
        described: list[dict[str, str | None]] = []
        for folder in self.config.folders:
            watch = self.watches.get(folder.path)
            if watch is not None:
                mode, why = watch.mode, self.inotify_refused.get(folder.path) or self.reasons.get(folder.path, "")
            else:
                mode, why = "not watched", self.unwatched.get(folder.path, "not watched yet")
            described.append({"path": str(folder.path), "unique_id": folder.unique_id, "mode": mode, "why": why})
        return described

    def stop(self) -> None:
        self._stopped = True
        observers = list(self.observers.values())
        for observer in observers:
            observer.stop()
        for observer in observers:
            if observer.is_alive():
                observer.join(timeout=5)

    def add_watch(self, folder: Folder, mode: str, identity: tuple[int, int]) -> Watch:
        """Schedule a folder on the observer for mode; raises OSError when the kernel refuses."""
        observer = self._observer(mode)
        if isinstance(observer, Poller):
            observer.schedule(folder)
            return Watch(folder, mode, observer, None, identity)
        handler = _Handler(self.recorder, folder, self.rescan, self.config.watch.follow_symlinks)
        observed = observer.schedule(handler, str(folder.path), recursive=folder.recursive)
        return Watch(folder, mode, observer, observed, identity)

    def _observer(self, mode: str) -> BaseObserver | Poller:
        observer = self.observers.get(mode)
        if observer is None:
            if mode == POLLING:
                observer = Poller(self.recorder, self.rescan, self.config.watch.poll_seconds)
            elif sys.platform == "linux":
                observer = _InotifyObserver(self._inotify_overflowed)
            else:
                observer = Observer()
            observer.start()
            self.observers[mode] = observer
        return observer

    def _refresh_folder(self, folder: Folder) -> None:
        watch = self.watches.get(folder.path)
        try:
            info = os.stat(folder.path)
        except OSError as error:
            self._forget_folder(folder, watch, error.strerror or str(error))
            return
        if not stat.S_ISDIR(info.st_mode):
            self._forget_folder(folder, watch, "it is not a directory")
            return
        identity = (info.st_dev, info.st_ino)
        if watch is not None:
            if watch.identity == identity:
                return
            log.warning("folder replaced or remounted; watching it again", path=str(folder.path))
            self._unwatch(watch)
        self._watch(folder, identity)

    def _forget_folder(self, folder: Folder, watch: Watch | None, why: str) -> None:
        if watch is not None:
            self._unwatch(watch)
            log.warning("folder gone; it is watched again once it is back", path=str(folder.path), reason=why)
        self.unwatched[folder.path] = f"{why}; it is watched again once it is back"

    def _watch(self, folder: Folder, identity: tuple[int, int]) -> None:
        if folder.path in self.inotify_refused:
            mode, reason = POLLING, "inotify limits were reached"
        else:
            mode, reason = watch_mode(folder.path, self.config.watch.polling, read_mountinfo())
        try:
            self.watches[folder.path] = self.add_watch(folder, mode, identity)
        except OSError as error:
            if mode == INOTIFY and error.errno in INOTIFY_LIMITS:
                self._refuse_inotify(folder, error)
                self._watch(folder, identity)
                return
            self.unwatched[folder.path] = f"cannot be watched ({error}); the rescan still covers it"
            log.error("cannot watch a folder; the rescan still covers it", path=str(folder.path), error=str(error))
            return
        self.unwatched.pop(folder.path, None)
        self.reasons[folder.path] = reason
        log.info(
            "watching",
            path=str(folder.path),
            unique_id=folder.unique_id,
            recursive=folder.recursive,
            mode=mode,
            reason=reason,
        )

    def _unwatch(self, watch: Watch) -> None:
        self.watches.pop(watch.folder.path, None)
        try:
            watch.cancel()
        except KeyError:
            return
        except Exception:
            log.exception("cannot stop a watch cleanly", path=str(watch.folder.path))

    def _refuse_inotify(self, folder: Folder, error: OSError) -> None:
        if error.errno == errno.ENOSPC:
            limit, fix = "fs.inotify.max_user_watches", raise_limit_command("max_user_watches", 524288)
        else:
            limit, fix = "fs.inotify.max_user_instances", raise_limit_command("max_user_instances", 1024)
            fix += ", or raise the open-file limit (LimitNOFILE=)"
        self.inotify_refused[folder.path] = f"the kernel's inotify limit {limit} was reached; raise it: {fix}"
        log.error(
            "INOTIFY LIMIT REACHED: polling this folder instead, which costs more",
            path=str(folder.path),
            limit=limit,
            fix=fix,
            error=str(error),
        )

    def _apply_refusals(self) -> list[Folder]:
        """Move off inotify every folder where the kernel refused a watch, even on one subdirectory."""
        observer = self.observers.get(INOTIFY)
        moved: list[Folder] = []
        while (
            sys.platform == "linux" and isinstance(observer, _InotifyObserver) and not observer.reader.refused.empty()
        ):
            raw, error = observer.reader.refused.get()
            path = Path(os.fsdecode(raw))
            for watch in list(self.watches.values()):
                if watch.mode == INOTIFY and path.is_relative_to(watch.folder.path):
                    self._unwatch(watch)
                    self._refuse_inotify(watch.folder, error)
                    self.unwatched[watch.folder.path] = "moving to polling"
                    moved.append(watch.folder)
        return moved

    def _replace_dead_observers(self) -> bool:
        replaced = False
        for mode, observer in list(self.observers.items()):
            if _running(observer):
                continue
            log.error("the observer stopped; starting a new one and rescanning every folder", mode=mode)
            del self.observers[mode]
            try:
                observer.stop()
            except Exception:
                log.exception("cannot stop the dead observer cleanly", mode=mode)
            for watch in [w for w in self.watches.values() if w.observer is observer]:
                del self.watches[watch.folder.path]
                self.unwatched[watch.folder.path] = f"waiting for the new {mode} observer"
            try:
                self._observer(mode)
            except OSError as error:
                log.error("cannot start a new observer; trying again at the next refresh", mode=mode, error=str(error))
            replaced = True
        return replaced

    def _drop_stopped_watches(self) -> list[Folder]:
        """Watches whose emitter stopped: watchdog ends one when its directory is deleted or cannot be listed."""
        stopped = [watch for watch in self.watches.values() if not watch.running()]
        for watch in stopped:
            self._unwatch(watch)
            self.unwatched[watch.folder.path] = "its watch stopped (deleted, moved or unmounted?); rewatched at refresh"
            log.warning("a folder's watch stopped; rescanning it", path=str(watch.folder.path), mode=watch.mode)
        return [watch.folder for watch in stopped]

    def _inotify_overflowed(self) -> None:
        log.warning(
            "inotify dropped events (its queue overflowed); rescanning",
            fix=raise_limit_command("max_queued_events", 65536),
        )
        for watch in list(self.watches.values()):
            if watch.mode == INOTIFY:
                self.rescan(watch.folder.path)
