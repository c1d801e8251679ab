"""Rebuilding what a lost ledger knew: which files on disk memories.ai already holds, from list_videos.

Every upload carries its file's identity tag, made from the file's content, and list_videos lists a video's tags
once it is parsed. So a file on disk whose identity tag a video of its folder's scope carries was delivered: its
row becomes `uploaded` with that videoNo, and it is not sent again. A video not parsed yet has no tags to tell;
it counts for a file only when the server named it after that file, and no other file or video could claim it.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from . import api, probe
from .config import Config, Folder
from .files import NotRegular, Version, fingerprint, identity_tag, open_beneath
from .ledger import Ledger
from .recorder import walk
from .states import DELIVERED
from .uploader import Client, ListedVideo

log = structlog.get_logger()

# A scope with more videos than this is listed in part, and the rest of its files are uploaded as new.
MAX_PAGES = 1000


@dataclass
class Rebuilt:
    """What a rebuild found, folder by folder."""

    matched: int = 0
    by_name: int = 0
    not_found: int = 0
    known: int = 0
    unreadable: list[str] = field(default_factory=list)


def scope_videos(client: Client, unique_id: str | None, stop: threading.Event) -> list[ListedVideo]:
    videos: list[ListedVideo] = []
    for page in range(1, MAX_PAGES + 1):
        if stop.is_set():
            break
        listed = client.list_videos(unique_id=unique_id, page=page)
        videos += listed
        if len(listed) < api.LIST_PAGE_SIZE:
            break
    return videos


def rebuild(
    config: Config,
    ledger: Ledger,
    client: Client,
    *,
    dry_run: bool,
    stop: threading.Event,
    report: Callable[[str], None],
) -> Rebuilt:
    """Record as delivered every file in the folders that a video of its scope proves memories.ai already holds."""
    found = Rebuilt()
    known = ledger.delivered_video_numbers()
    scopes: dict[str | None, list[Folder]] = {}
    for folder in config.folders:
        scopes.setdefault(folder.unique_id, []).append(folder)
    for unique_id, folders in scopes.items():
        videos = scope_videos(client, unique_id, stop)
        report(f"scope {unique_id or api.DEFAULT_SCOPE}: {len(videos)} videos listed")
        on_disk = {
            folder.path: [
                (Path(path), info) for path, info in walk(folder, follow_symlinks=config.watch.follow_symlinks)
            ]
            for folder in folders
        }
        # A name proves a video's file only when no other file of the scope has that name and size.
        stems = collections.Counter((path.stem, info.st_size) for files in on_disk.values() for path, info in files)
        evidence = _Evidence(videos, known, stems)
        for folder in folders:
            _rebuild_folder(config, folder, on_disk[folder.path], evidence, ledger, dry_run=dry_run, found=found)
    return found


class _Evidence:
    """What a scope's videos can prove: identity tags of parsed videos, and the names of unparsed ones."""

    def __init__(self, videos: list[ListedVideo], known: set[str], stems: collections.Counter[tuple[str, int]]) -> None:
        self.by_tag = {tag: video for video in videos for tag in video.tags or () if tag.startswith("mi-")}
        # A video the ledger already gave to a file is no other file's by name.
        unknown = [video for video in videos if video.tags is None and video.video_no not in known]
        self.unparsed = collections.Counter((video.name, video.size) for video in unknown)
        self.named = {(video.name, video.size): video for video in unknown}
        self.stems = stems

    def by_identity(self, content: str) -> ListedVideo | None:
        return self.by_tag.get(identity_tag(content))

    def by_name(self, path: Path, size: int) -> ListedVideo | None:
        key = (path.stem, size)
        return self.named[key] if self.unparsed[key] == 1 and self.stems[key] == 1 else None


def _rebuild_folder(
    config: Config,
    folder: Folder,
    on_disk: list[tuple[Path, os.stat_result]],
    evidence: _Evidence,
    ledger: Ledger,
    *,
    dry_run: bool,
    found: Rebuilt,
) -> None:
    for path, _ in on_disk:
        if probe.check_name(path) is not None:
            continue
        row = ledger.get(path)
        if row is not None and row.state in DELIVERED:
            found.known += 1
            continue
        try:
            with open_beneath(folder.path, path, follow_symlinks=config.watch.follow_symlinks) as (fd, opened):
                content = fingerprint(fd, opened.st_size)
                version = Version.of(opened)
        except (OSError, NotRegular) as error:
            found.unreadable.append(f"{path}: {getattr(error, 'strerror', None) or error}")
            continue
        video = evidence.by_identity(content)
        if video is not None:
            found.matched += 1
            note = "rebuilt from list_videos: it carries this file's identity tag"
        elif (video := evidence.by_name(path, version.size)) is not None:
            found.by_name += 1
            note = "rebuilt from list_videos: the only video of its name and size, not yet parsed"
        else:
            found.not_found += 1
            continue
        if not dry_run:
            ledger.record_rebuilt(path, folder, version, content, video.video_no, note)
            log.info("rebuilt", path=os.fsdecode(path), unique_id=folder.unique_id, state="uploaded")
