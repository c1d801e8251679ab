"""After upload: delete or move, only once a videoNo is stored, never overwriting, retried when it fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memories_ingest.config import Config, parse
from memories_ingest.files import Version, fingerprint
from memories_ingest.finisher import Finisher
from memories_ingest.ledger import Ledger, Row
from memories_ingest.pacing import RetryPolicy
from memories_ingest.recorder import Recorder
from memories_ingest.states import PENDING, UPLOADED
from memories_ingest.watcher import Watcher

from conftest import wait_until

FAST_RETRIES = RetryPolicy(base=0.1, factor=2.0, cap=0.3, jitter=0.1)


def configure(tmp_path: Path, **folder: Any) -> Config:
    watched = tmp_path / "watched"
    watched.mkdir(exist_ok=True)
    document = {
        "ledger": str(tmp_path / "ledger.db"),
        "watch": {"settle_seconds": 0.2},
        "folders": [{"path": str(watched), "unique_id": "scope", "recursive": True, **folder}],
    }
    return parse(document, tmp_path / "config.yaml")


def write(path: Path, content: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(300_000) if content is None else content)
    return path


def seen(ledger: Ledger, config: Config, path: Path) -> Row:
    folder = config.folder_for(path)
    assert folder is not None
    info = path.stat()
    ledger.record_seen(path, folder.path, folder.unique_id, Version.of(info))
    row = ledger.get(path)
    assert row is not None
    return row


def content_of(path: Path) -> str:
    with path.open("rb") as file:
        return fingerprint(file.fileno(), path.stat().st_size)


def record(ledger: Ledger, config: Config, path: Path) -> Row:
    """The file as the watcher and the settler leave it: seen, fingerprinted and queued."""
    row = seen(ledger, config, path)
    assert ledger.mark_queued(row, content_of(path), {})
    return ledger.get_id(row.id)


def deliver(ledger: Ledger, config: Config, path: Path, video_no: str = "VI1", action: str | None = None) -> Row:
    """Queued, claimed and uploaded, with the folder's action unless one is given."""
    record(ledger, config, path)
    folder = config.folder_for(path)
    assert folder is not None
    claimed = ledger.claim([folder.path])
    assert claimed is not None and claimed.path == path
    ledger.mark_uploaded(claimed, video_no, action=action or folder.action)
    return ledger.get_id(claimed.id)


@contextlib.contextmanager
def running(finisher: Finisher) -> Iterator[Finisher]:
    thread = threading.Thread(target=finisher.run, name="finisher-under-test")
    thread.start()
    try:
        yield finisher
    finally:
        finisher.stop.set()
        finisher.wake.set()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the finisher did not stop"
    assert finisher.fatal is None


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger(tmp_path / "ledger.db")
    yield opened
    opened.close()


def finisher_for(config: Config, ledger: Ledger) -> Finisher:
    return Finisher(
        stop=threading.Event(),
        config=config,
        ledger=ledger,
        wake=threading.Event(),
        policy=FAST_RETRIES,
        clock=time.time,
    )


def test_delete_waits_for_the_video_no(tmp_path: Path, ledger: Ledger) -> None:
    config = configure(tmp_path, after_upload="delete")
    clip = write(tmp_path / "watched" / "clip.mp4")
    record(ledger, config, clip)
    claimed = ledger.claim([config.folders[0].path])
    assert claimed is not None
    finisher = finisher_for(config, ledger)
    with running(finisher):
        finisher.wake.set()
        threading.Event().wait(0.5)
        assert clip.exists(), "a file being uploaded was deleted"
        ledger.mark_uploaded(claimed, "VI42", action="delete")
        finisher.wake.set()
        wait_until(lambda: not clip.exists(), 5, "the delete")
    row = ledger.get(clip)
    assert row is not None
    assert (row.state, row.video_no, row.action, row.action_error, row.moved_to) == (
        UPLOADED,
        "VI42",
        None,
        None,
        None,
    )


def test_move_keeps_the_relative_path_and_never_overwrites(tmp_path: Path, ledger: Ledger) -> None:
    config = configure(tmp_path, after_upload="move", move_to=str(tmp_path / "archive"))
    (tmp_path / "archive").mkdir()
    clip = write(tmp_path / "watched" / "cam1" / "day" / "clip.mp4")
    content = clip.read_bytes()
    taken = write(tmp_path / "archive" / "cam1" / "day" / "clip.mp4", b"someone else's")
    also_taken = write(tmp_path / "archive" / "cam1" / "day" / "clip-1.mp4", b"another one")
    deliver(ledger, config, clip)
    finisher = finisher_for(config, ledger)
    with running(finisher):
        row = wait_until(lambda: (r := ledger.get(clip)) and r.action is None and r, 5, "the move")
    target = tmp_path / "archive" / "cam1" / "day" / "clip-2.mp4"
    assert row.moved_to == target
    assert target.read_bytes() == content
    assert not clip.exists()
    assert taken.read_bytes() == b"someone else's"
    assert also_taken.read_bytes() == b"another one"
    assert (row.state, row.video_no, row.action_error) == (UPLOADED, "VI1", None)


def test_move_to_another_filesystem_copies_without_overwriting(tmp_path: Path, ledger: Ledger) -> None:
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    archive = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="memories-ingest-test-"))
    try:
        config = configure(tmp_path, after_upload="move", move_to=str(archive))
        clip = write(tmp_path / "watched" / "clip.mp4")
        os.utime(clip, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
        content = clip.read_bytes()
        write(archive / "clip.mp4", b"already here")
        deliver(ledger, config, clip)
        with running(finisher_for(config, ledger)):
            row = wait_until(lambda: (r := ledger.get(clip)) and r.action is None and r, 5, "the move")
        assert row.moved_to == archive / "clip-1.mp4"
        assert row.moved_to.read_bytes() == content
        assert row.moved_to.stat().st_mtime_ns == 1_600_000_000_123_456_789
        assert (archive / "clip.mp4").read_bytes() == b"already here"
        assert not clip.exists()
    finally:
        shutil.rmtree(archive)


@pytest.mark.parametrize("blocked", ["a file where a directory belongs", "a read-only place"])
def test_a_failed_move_is_retried_and_the_row_keeps_its_video_no(tmp_path: Path, ledger: Ledger, blocked: str) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    in_the_way = write(archive / "cam1", b"not a directory")
    config = configure(tmp_path, after_upload="move", move_to="/proc/sys" if "read-only" in blocked else str(archive))
    clip = write(tmp_path / "watched" / "cam1" / "clip.mp4")
    deliver(ledger, config, clip, video_no="VI7")
    with running(finisher_for(config, ledger)):
        row = wait_until(lambda: (r := ledger.get(clip)) and r.action_attempts >= 3 and r, 10, "three attempts")
        assert (row.state, row.video_no, row.action) == (UPLOADED, "VI7", "move")
        assert row.action_error
        assert row.action_at is not None
        assert clip.exists()
        if "read-only" in blocked:
            return
        in_the_way.unlink()
        row = wait_until(lambda: (r := ledger.get(clip)) and r.action is None and r, 10, "the move, once it can")
    assert row.moved_to == archive / "cam1" / "clip.mp4"
    assert (row.state, row.video_no, row.action_error) == (UPLOADED, "VI7", None)
    assert not clip.exists()


def test_a_file_changed_after_upload_is_left_to_settle_again(tmp_path: Path, ledger: Ledger) -> None:
    config = configure(tmp_path, after_upload="delete")
    clip = write(tmp_path / "watched" / "clip.mp4")
    deliver(ledger, config, clip)
    write(clip, b"a new recording under the same name")
    with running(finisher_for(config, ledger)):
        row = wait_until(lambda: (r := ledger.get(clip)) and r.state == PENDING and r, 5, "settling again")
    assert clip.read_bytes() == b"a new recording under the same name"
    assert (row.prior_state, row.action) == (UPLOADED, "delete")


@pytest.mark.parametrize("interrupted", ["after the link", "after the unlink"])
def test_an_interrupted_move_is_finished_not_repeated(tmp_path: Path, ledger: Ledger, interrupted: str) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    config = configure(tmp_path, after_upload="move", move_to=str(archive))
    clip = write(tmp_path / "watched" / "clip.mp4")
    deliver(ledger, config, clip)
    os.link(clip, archive / "clip.mp4")
    if interrupted == "after the unlink":
        clip.unlink()
    with running(finisher_for(config, ledger)):
        row = wait_until(lambda: (r := ledger.get(clip)) and r.action is None and r, 5, "the move")
    assert row.moved_to == archive / "clip.mp4"
    assert sorted(p.name for p in archive.iterdir()) == ["clip.mp4"]
    assert not clip.exists()


def test_a_copy_of_an_uploaded_file_gets_the_action_too(tmp_path: Path, ledger: Ledger) -> None:
    config = configure(tmp_path, after_upload="delete")
    original = write(tmp_path / "watched" / "clip.mp4")
    record(ledger, config, original)
    claimed = ledger.claim([config.folders[0].path])
    assert claimed is not None
    ledger.mark_uploaded(claimed, "VI1")
    copy = write(tmp_path / "watched" / "copy.mp4", original.read_bytes())
    row = seen(ledger, config, copy)
    found = ledger.delivered_copy(row, content_of(copy))
    assert found is not None and found.path == original
    ledger.mark_duplicate(row, content_of(copy), found, action=config.folders[0].action)
    with running(finisher_for(config, ledger)):
        wait_until(lambda: not copy.exists(), 5, "the copy's delete")
    assert original.exists()
    assert (ledger.get_id(row.id).state, ledger.get_id(row.id).video_no) == (UPLOADED, "VI1")


def test_a_folder_changed_to_keep_leaves_the_file(tmp_path: Path, ledger: Ledger) -> None:
    config = configure(tmp_path)
    clip = write(tmp_path / "watched" / "clip.mp4")
    deliver(ledger, config, clip, action="delete")
    with running(finisher_for(config, ledger)):
        wait_until(lambda: ledger.get_id(1).action is None, 5, "the action to be dropped")
    assert clip.exists()


@pytest.mark.parametrize("after_upload", ["move", "delete"])
def test_moved_or_deleted_files_do_not_look_new_to_the_watcher(
    tmp_path: Path, ledger: Ledger, after_upload: str
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    config = configure(tmp_path, after_upload=after_upload, move_to=str(archive))
    recorder = Recorder(config, ledger, threading.Event())
    rescans: list[Path | None] = []
    watcher = Watcher(config, recorder, rescans.append)
    watcher.start()
    try:
        clip = write(tmp_path / "watched" / "cam1" / "clip.mp4")
        wait_until(lambda: ledger.get(clip), 5, "the watcher to record the file")
        deliver(ledger, config, clip)
        with running(finisher_for(config, ledger)):
            wait_until(lambda: ledger.get_id(1).action is None, 5, "the action")
        assert not clip.exists()
        # Give the observer time to deliver what the move or delete caused, then reconcile as the rescan does.
        threading.Event().wait(1.0)
        assert recorder.scan(config.folders[0]) == 0
    finally:
        watcher.stop()
    (row,) = ledger.rows()
    assert (row.path, row.state, row.video_no) == (clip, UPLOADED, "VI1")
    assert row.moved_to == (archive / "cam1" / "clip.mp4" if after_upload == "move" else None)
    assert ledger.pending() == []
