"""Which filesystem a path lives on: the mount table parsed, and the mount of a path found in it."""

from __future__ import annotations

from pathlib import Path

from memories_ingest.mounts import NETWORK_FILESYSTEMS, mount_for, parse_mountinfo, read_mountinfo

from conftest import SAMPLE_MOUNTINFO


def test_the_mountinfo_parser_finds_the_mount_of_a_path() -> None:
    mounts = parse_mountinfo(SAMPLE_MOUNTINFO)
    assert len(mounts) == 7

    def fstype(path: str) -> str | None:
        mount = mount_for(Path(path), mounts)
        return mount.fstype if mount else None

    assert fstype("/mnt/nas/cams/front") == "nfs4"
    assert fstype("/mnt/nas/local copy/clips") == "tmpfs"
    assert fstype("/mnt/nassy") == "ext4"
    assert fstype("/srv/share") == "cifs"
    assert fstype("/media/cloud/a/b") == "fuse.rclone"
    assert fstype("/mnt/stack/x") == "smb3"
    assert fstype("/home/user") == "ext4"
    assert mount_for(Path("/mnt/nas/cams"), mounts) == (Path("/mnt/nas"), "nfs4", "nas:/export/cams")


def test_a_local_folder_is_not_a_network_filesystem(tmp_path: Path) -> None:
    mount = mount_for(tmp_path.resolve(), parse_mountinfo(read_mountinfo()))
    assert mount is not None and mount.fstype not in NETWORK_FILESYSTEMS
