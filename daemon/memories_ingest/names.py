"""Which file names the daemon records: videos, and none of the names that unfinished or hidden files have."""

from __future__ import annotations

import fnmatch
import os
import re

from .api import VIDEO_EXTENSIONS

IGNORED_PATTERNS = ("*.part", "*.tmp", "*.crdownload", "~*", "*~", ".*")

_IGNORED = re.compile("|".join(fnmatch.translate(pattern) for pattern in IGNORED_PATTERNS))


def is_ignored_name(name: str) -> bool:
    """Hidden files and the names that downloaders, editors and copy tools give unfinished files."""
    return _IGNORED.match(name.lower()) is not None


def is_video_name(name: str) -> bool:
    """Rows are for videos: a camera's thumbnails, sidecars and notes are not recorded at all."""
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS
