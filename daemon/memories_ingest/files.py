"""Files as the daemon sees them: which version of a file it is, what its content is, and how to open it safely.

A file is the same file only while its size, mtime, inode and ctime are all unchanged. The ctime matters: a
rewrite in place that restores the mtime (`rsync --inplace -t`, `cp -p` over it) changes only the ctime, and a
`chmod` that makes an unreadable file readable changes only the ctime too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

FINGERPRINT_SAMPLE = 1 << 20
IDENTITY_TAG_PREFIX = "mi-"

_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class NotRegular(Exception):
    """The path is not a regular file, or leads through a symlink; ``str()`` says what it is."""


class Version(NamedTuple):
    """Which version of a file this is: any write, replacement, or change of its metadata makes another."""

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int | None

    @classmethod
    def of(cls, info: os.stat_result) -> Version:
        return cls(info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns)

    def same_as(self, other: Version) -> bool:
        """The same version; a ctime not recorded yet (a ledger from before ctimes) does not count."""
        if self.ctime_ns is None or other.ctime_ns is None:
            return self[:3] == other[:3]
        return self == other


def fingerprint(fd: int, size: int) -> str:
    """The size and the first and last MiB: cheap to take, and different for any new recording."""
    digest = hashlib.sha256(str(size).encode())
    digest.update(os.pread(fd, FINGERPRINT_SAMPLE, 0))
    if size > FINGERPRINT_SAMPLE:
        digest.update(os.pread(fd, FINGERPRINT_SAMPLE, max(size - FINGERPRINT_SAMPLE, FINGERPRINT_SAMPLE)))
    return digest.hexdigest()


def identity_tag(content: str) -> str:
    """The tag that goes up with every upload of this content: list_videos can later prove which file a video is."""
    return IDENTITY_TAG_PREFIX + hashlib.sha256(b"memories-ingest identity\0" + content.encode()).hexdigest()[:16]


def wire_name(path: Path) -> str:
    """The file name as the upload sends it: the name itself when it is UTF-8.

    A name with bytes that are not UTF-8 (a camera that writes Latin-1) cannot go into the form as it is: each
    such byte is sent as %XX, and every % of the name as %25, so the escape is lossless. The ledger keeps the
    exact bytes either way.
    """
    raw = os.fsencode(path.name)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", "surrogateescape").replace("%", "%25")
    return "".join(f"%{ord(ch) - 0xDC00:02X}" if 0xDC80 <= ord(ch) <= 0xDCFF else ch for ch in text)


def describe_kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISLNK: "a symbolic link",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


def require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise NotRegular(f"not a regular file (it is {describe_kind(mode)})")


@contextlib.contextmanager
def open_beneath(root: Path, path: Path, *, follow_symlinks: bool = False) -> Iterator[tuple[int, os.stat_result]]:
    """Open a regular file inside root, one component at a time, never through a symlink and never blocking.

    Each directory below root is opened relative to its parent with O_NOFOLLOW, so a symlink swapped in
    anywhere in the path (not just the last component) fails the open instead of leading outside the
    watched folder. O_NONBLOCK: should the name be swapped for a FIFO, the open still returns. Raises
    NotRegular for what is not a regular file, OSError for what cannot be opened now.
    """
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise NotRegular(f"{path} is outside the watched folder {root}") from None
    if not parts:
        raise NotRegular("not a regular file (it is a directory)")
    try:
        if follow_symlinks:
            fd = os.open(path, _OPEN_FILE & ~os.O_NOFOLLOW)
        else:
            directory = os.open(root, _OPEN_DIRECTORY & ~os.O_NOFOLLOW)
            try:
                for part in parts[:-1]:
                    below = os.open(part, _OPEN_DIRECTORY, dir_fd=directory)
                    os.close(directory)
                    directory = below
                fd = os.open(parts[-1], _OPEN_FILE, dir_fd=directory)
            finally:
                os.close(directory)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotRegular("the path goes through a symbolic link, and symlinks are not followed") from None
        raise
    try:
        status = os.fstat(fd)
        require_regular(status.st_mode)
        yield fd, status
    finally:
        os.close(fd)


def symlink_between(top: Path, path: Path) -> bool:
    """Whether a step from top down to path (path included, top not) is a symlink."""
    current = top
    for part in path.relative_to(top).parts:
        current = current / part
        if current.is_symlink():
            return True
    return False
