"""After upload: delete the file, or move it out of the watched folder, once memories.ai has given it a videoNo.

What remains to do lives in the ledger's `action` column until it is done, so a failure (permission denied, a
read-only mount, a missing target) is logged and retried with backoff, and the row keeps its state and videoNo.
A moved or deleted file leaves the watched folder while its row stays delivered; the rescan leaves missing
delivered rows alone, so nothing takes the file for a new one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import structlog

from .config import Config, Folder
from .files import Version, fingerprint
from .ledger import Ledger, Row
from .pacing import RetryPolicy
from .worker import Worker

log = structlog.get_logger()

DELETE = "delete"
MOVE = "move"
IDLE_SECONDS = 1.0
ACTION_RETRY_POLICY = RetryPolicy()
COPY_BLOCK = 1 << 26
COPY_SECONDS = 3600.0
# Where a hard link cannot be made the file is copied: another filesystem, or one without hard links.
CANNOT_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK})
# A path that is no longer there, or that now goes through a symlink: the uploaded file is not where it was.
NOT_THERE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class ActionFailed(Exception):
    """The delete or move cannot be done now; the message says why, and it is tried again later."""


class Finisher(Worker):
    """Deletes or moves each delivered file whose folder asks for it, and retries what fails."""

    name = "finisher"

    def __init__(
        self,
        *,
        stop: threading.Event,
        config: Config,
        ledger: Ledger,
        wake: threading.Event,
        policy: RetryPolicy = ACTION_RETRY_POLICY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(stop)
        self.config = config
        self.ledger = ledger
        self.wake = wake
        self.policy = policy
        self.clock = clock

    @property
    def quiet_seconds(self) -> float:
        """A move to another filesystem copies up to 3 GiB in one loop, perhaps to a slow disk."""
        return COPY_SECONDS

    def loop(self) -> None:
        self.wake.clear()
        # One file a loop: a copy to another filesystem can take minutes, and each loop is a sign of life.
        row = self.ledger.due_action()
        if row is not None:
            self.finish(row)
            return
        next_at = self.ledger.next_action_at()
        wait = IDLE_SECONDS if next_at is None else min(IDLE_SECONDS, max(0.05, next_at - self.clock()))
        self.wake.wait(wait)

    def finish(self, row: Row) -> None:
        context = {
            "path": str(row.path),
            "unique_id": row.unique_id,
            "state": row.state,
            "video_no": row.video_no,
            "action": row.action,
        }
        folder = self.config.folder_for(row.path)
        try:
            if folder is None:
                raise ActionFailed("the file's folder is no longer in the config")
            if folder.after_upload == "keep":
                # The config changed since the upload: keeping the file is always safe.
                self.ledger.action_done(row.id)
                log.info("after_upload is now keep: the file stays", **context)
            elif row.action == DELETE:
                self.delete(row, folder, context)
            elif row.action == MOVE:
                self.move(row, folder, context)
            else:
                raise ActionFailed(f"{row.action!r} is not an after-upload action")
        except (ActionFailed, OSError) as error:
            reason = _describe(error)
            delay = self.policy.delay(row.action_attempts + 1)
            self.ledger.action_failed(row.id, reason, self.clock() + delay)
            log.warning(
                "after-upload action failed; will retry",
                reason=reason,
                attempt=row.action_attempts + 1,
                retry_in=round(delay, 1),
                **context,
            )

    def delete(self, row: Row, folder: Folder, context: Mapping[str, object]) -> None:
        with self._directory_of(folder, row.path) as directory:
            info = _regular_file(directory, row.path.name)
            if info is not None:
                assert directory is not None
                if not _as_uploaded(directory, row.path.name, row, info):
                    self._settle_again(row, folder, info, context)
                    return
                assert directory is not None
                os.unlink(row.path.name, dir_fd=directory)
                os.fsync(directory)
        self.ledger.action_done(row.id)
        log.info("deleted after upload" if info else "nothing to delete: the file was already gone", **context)

    def move(self, row: Row, folder: Folder, context: Mapping[str, object]) -> None:
        if folder.move_to is None:
            raise ActionFailed("the folder has no move_to")
        # Only directories below move_to are made: a move_to that is missing is most likely an unmounted disk.
        if not folder.move_to.is_dir():
            raise ActionFailed(f"move_to {folder.move_to} is not a directory (is it mounted?)")
        target_dir = folder.move_to / row.path.parent.relative_to(folder.path)
        name = row.path.name
        with self._directory_of(folder, row.path) as directory:
            info = _regular_file(directory, name)
            if info is None:
                target = _earlier_move(target_dir, name, row)
                self.ledger.action_done(row.id, target)
                if target is None:
                    log.warning("nothing to move: the file is no longer where it was uploaded from", **context)
                else:
                    log.info("moved after upload", moved_to=str(target), **context)
                return
            assert directory is not None
            if not _as_uploaded(directory, name, row, info):
                self._settle_again(row, folder, info, context)
                return
            target_dir.mkdir(parents=True, exist_ok=True)
            target, placed_now = _place(directory, name, info, row, target_dir)
            _fsync_directory(target_dir)
            try:
                os.unlink(name, dir_fd=directory)
            except FileNotFoundError:
                pass
            except OSError:
                if placed_now:
                    with contextlib.suppress(OSError):
                        os.unlink(target)
                raise
            os.fsync(directory)
        self.ledger.action_done(row.id, target)
        log.info("moved after upload", moved_to=str(target), **context)

    def _settle_again(self, row: Row, folder: Folder, info: os.stat_result, context: Mapping[str, object]) -> None:
        """The file is no longer the one uploaded: it is checked again, and its action waits until it is delivered."""
        self.ledger.record_seen(row.path, folder.path, folder.unique_id, Version.of(info))
        log.info("the file changed after upload; it settles again before any delete or move", **context)

    @contextlib.contextmanager
    def _directory_of(self, folder: Folder, path: Path) -> Iterator[int | None]:
        directory = _open_below(folder.path, path.parent, self.config.watch.follow_symlinks)
        try:
            yield directory
        finally:
            if directory is not None:
                os.close(directory)


def _open_below(folder: Path, directory: Path, follow_symlinks: bool) -> int | None:
    """A directory opened one step at a time below the folder, so a symlink swapped into the path leads nowhere.

    None when it is gone. A folder that cannot be opened raises: it may be unmounted, not emptied.
    """
    flags = _OPEN_DIRECTORY & ~os.O_NOFOLLOW if follow_symlinks else _OPEN_DIRECTORY
    fd = os.open(folder, _OPEN_DIRECTORY & ~os.O_NOFOLLOW)
    for part in directory.relative_to(folder).parts:
        try:
            below = os.open(part, flags, dir_fd=fd)
        except OSError as error:
            os.close(fd)
            if error.errno in NOT_THERE:
                return None
            raise
        os.close(fd)
        fd = below
    return fd


def _describe(error: Exception) -> str:
    if not isinstance(error, OSError) or not error.strerror:
        return str(error)
    names = " -> ".join(os.fsdecode(n) for n in (error.filename, error.filename2) if n is not None)
    return f"{error.strerror}: {names}" if names else error.strerror


def _as_uploaded(directory: int, name: str, row: Row, info: os.stat_result) -> bool:
    """Whether the file is still the one uploaded.

    When only its ctime moved (a hard link, this finisher's own among them, or a chmod), its content decides.
    """
    now = Version.of(info)
    if row.version.same_as(now):
        return True
    if now[:3] != row.version[:3] or row.fingerprint is None:
        return False
    fd = os.open(name, _OPEN_FILE, dir_fd=directory)
    try:
        return fingerprint(fd, info.st_size) == row.fingerprint
    finally:
        os.close(fd)


def _regular_file(directory: int | None, name: str) -> os.stat_result | None:
    """The regular file with that name in directory, as it is now; None when there is none."""
    if directory is None:
        return None
    try:
        info = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except OSError as error:
        if error.errno in NOT_THERE:
            return None
        raise
    return info if stat.S_ISREG(info.st_mode) else None


def _numbered(name: str, number: int) -> str:
    """clip.mp4, then clip-1.mp4, clip-2.mp4 ...: the names a moved file may take."""
    if number == 0:
        return name
    stem, suffix = os.path.splitext(name)
    return f"{stem}-{number}{suffix}"


def _holds(target: Path, row: Row) -> bool:
    """Whether target already holds the uploaded content: what an interrupted earlier move left there."""
    if row.fingerprint is None:
        return False
    try:
        fd = os.open(target, _OPEN_FILE)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        return stat.S_ISREG(info.st_mode) and info.st_size == row.size and fingerprint(fd, row.size) == row.fingerprint
    except OSError:
        return False
    finally:
        os.close(fd)


def _earlier_move(target_dir: Path, name: str, row: Row) -> Path | None:
    """Where a move that ended before the ledger heard of it put the file, if it did."""
    number = 0
    while os.path.lexists(candidate := target_dir / _numbered(name, number)):
        if _holds(candidate, row):
            return candidate
        number += 1
    return None


def _place(directory: int, name: str, info: os.stat_result, row: Row, target_dir: Path) -> tuple[Path, bool]:
    """Give the file a name of its own in target_dir, never replacing another file.

    Returns the name, and whether it was made now (False: an interrupted earlier move had made it).
    """
    number = 0
    while True:
        target = target_dir / _numbered(name, number)
        try:
            _link_or_copy(directory, name, info, target)
        except FileExistsError:
            if _holds(target, row):
                return target, False
            number += 1
            continue
        return target, True


def _link_or_copy(directory: int, name: str, info: os.stat_result, target: Path) -> None:
    """A second name for the file at target; raises FileExistsError rather than replace anything there."""
    try:
        os.link(name, target, src_dir_fd=directory, follow_symlinks=False)
    except OSError as error:
        if error.errno not in CANNOT_LINK:
            raise
        _copy(directory, name, info, target)


def _copy(directory: int, name: str, info: os.stat_result, target: Path) -> None:
    """Copy the file to a new file at target, on disk before this returns, with the source's mode, owner and times."""
    source = os.open(name, _OPEN_FILE, dir_fd=directory)
    try:
        if not _same_identity(os.fstat(source), info):
            raise ActionFailed("the file was replaced just before it was copied")
        made = os.open(target, _CREATE_FILE, 0o600)
        try:
            copied = 0
            while copied < info.st_size:
                sent = os.sendfile(made, source, copied, min(COPY_BLOCK, info.st_size - copied))
                if sent == 0:
                    raise ActionFailed("the file shrank while it was copied")
                copied += sent
            if not _same_identity(os.fstat(source), info):
                raise ActionFailed("the file changed while it was copied")
            with contextlib.suppress(PermissionError):
                os.fchown(made, info.st_uid, info.st_gid)
            os.fchmod(made, stat.S_IMODE(info.st_mode))
            os.utime(made, ns=(info.st_atime_ns, info.st_mtime_ns))
            os.fsync(made)
        except BaseException:
            os.close(made)
            with contextlib.suppress(OSError):
                os.unlink(target)
            raise
        os.close(made)
    finally:
        os.close(source)


def _same_identity(now: os.stat_result, then: os.stat_result) -> bool:
    return Version.of(now) == Version.of(then)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, _OPEN_DIRECTORY & ~os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
