"""Decide whether a file is a video memories.ai will accept, before a byte is uploaded.

Cheap checks (name, size, magic bytes) run in the daemon. Everything that needs FFmpeg runs in a short-lived
child (:mod:`memories_ingest.inspector`) with CPU, memory and wall-clock limits, because FFmpeg parses untrusted
files and a hostile or broken one must cost a rejection, never the daemon. :mod:`memories_ingest.prober` starts
that child.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import prober
from .api import CONTENT_TYPES, MAX_FILE_BYTES, VIDEO_EXTENSIONS
from .files import NotRegular, require_regular
from .inspector import NOT_A_CONTAINER, MediaInfo, Rejection, container_family

__all__ = ["MediaInfo", "Rejection", "check_header", "check_name", "content_type_for", "probe_fd", "probe_path"]

_GIB = 1024**3


def content_type_for(path: str | os.PathLike[str]) -> str | None:
    return CONTENT_TYPES.get(Path(path).suffix.lower())


def check_name(path: str | os.PathLike[str]) -> str | None:
    suffix = Path(path).suffix
    if suffix.lower() in VIDEO_EXTENSIONS:
        return None
    expected = ", ".join(sorted(VIDEO_EXTENSIONS))
    if not suffix:
        return f"the name has no extension; videos end in {expected}"
    return f"extension {suffix} is not a video extension ({expected})"


def check_header(fd: int, size: int) -> None:
    if size == 0:
        raise Rejection("file is empty")
    if size > MAX_FILE_BYTES:
        raise Rejection(f"file is {size / _GIB:.1f} GiB, over the {MAX_FILE_BYTES / _GIB:g} GiB limit")
    if container_family(os.pread(fd, 12, 0)) is None:
        raise Rejection(NOT_A_CONTAINER)


def probe_path(path: str | os.PathLike[str], *, require_audio: bool = False, timeout: float = 30.0) -> MediaInfo:
    """Check and probe the file at ``path``; raise :class:`Rejection` if it will not be uploaded.

    Only regular files are opened: a FIFO would block the open, and a symlink could point
    anywhere. ``OSError`` (the file vanished, no permission) propagates unchanged.
    """
    _require_regular_file(os.lstat(path).st_mode)
    # O_NONBLOCK: should the name be swapped for a FIFO after the lstat, the open still returns.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        _require_regular_file(status.st_mode)
        check_header(fd, status.st_size)
        return probe_fd(fd, require_audio=require_audio, timeout=timeout)
    finally:
        os.close(fd)


def probe_fd(
    fd: int,
    *,
    require_audio: bool = False,
    timeout: float = 30.0,
    cpu_seconds: int = 60,
    memory_bytes: int = 1 << 30,
) -> MediaInfo:
    """Run FFmpeg over the open regular file ``fd`` in a sandboxed child.

    The offset of ``fd`` is left untouched. Raises :class:`Rejection` when the file is not
    acceptable, including when it hangs, crashes or exhausts the child.
    """
    _require_regular_file(os.fstat(fd).st_mode)
    return prober.probe_fd(
        fd, require_audio=require_audio, timeout=timeout, cpu_seconds=cpu_seconds, memory_bytes=memory_bytes
    )


def _require_regular_file(mode: int) -> None:
    try:
        require_regular(mode)
    except NotRegular as error:
        raise Rejection(str(error)) from None
