"""Which filesystem a path lives on, read from the kernel's mount table.

The watcher asks so that it polls a folder on a network filesystem, where inotify never sees what other machines do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

MOUNTINFO = Path("/proc/self/mountinfo")

# Changes made by other machines never reach this kernel's inotify on these.
# fmt: off
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "coda", "9p", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "orangefs", "gfs2", "ocfs2", "davfs", "virtiofs", "vboxsf", "vmhgfs", "fuse.sshfs", "fuse.rclone",
    "fuse.s3fs", "fuse.goofys", "fuse.gcsfuse", "fuse.blobfuse", "fuse.blobfuse2", "fuse.mountpoint-s3",
    "fuse.juicefs", "fuse.glusterfs", "fuse.ceph-fuse", "fuse.davfs", "fuse.smbnetfs", "fuse.curlftpfs",
    "fuse.vmhgfs-fuse",
})
# fmt: on


class Mount(NamedTuple):
    point: Path
    fstype: str
    source: str


def _unescape(field: bytes) -> Path:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return Path(os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match[1], 8)]), field)))


def parse_mountinfo(text: bytes) -> list[Mount]:
    """The mounts in a /proc/<pid>/mountinfo, in the kernel's order: a later mount hides an earlier one."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        try:
            separator = fields.index(b"-", 6)
            mounts.append(
                Mount(_unescape(fields[4]), os.fsdecode(fields[separator + 1]), os.fsdecode(fields[separator + 2]))
            )
        except (ValueError, IndexError):
            continue
    return mounts


def mount_for(path: Path, mounts: list[Mount]) -> Mount | None:
    """The mount a path lives on: the deepest mount point above it, the latest one where mounts are stacked."""
    found: Mount | None = None
    for mount in mounts:
        if path.is_relative_to(mount.point) and (found is None or len(mount.point.parts) >= len(found.point.parts)):
            found = mount
    return found


def read_mountinfo() -> bytes:
    try:
        return MOUNTINFO.read_bytes()
    except OSError:
        return b""
