"""The whole pipeline against the sandbox: watch, settle, validate, upload, retry, and restart."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest

from memories_ingest.api import DIALECTS
from memories_ingest.files import identity_tag
from memories_ingest.ledger import Row
from memories_ingest.samples import faststart_padding, write_video
from memories_ingest.sandbox import Sandbox
from memories_ingest.states import FAILED, REJECTED, RETRYING, UPLOADED

from conftest import API_KEY, Pipeline, RawServer, daemon_config, read_request_head, row_of, spawned, wait_until

Build = Callable[..., Pipeline]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("name", "codec", "content_type"),
    [
        ("h264.mp4", "h264", "video/mp4"),
        ("hevc.mp4", "hevc", "video/mp4"),
        ("vp9.mkv", "vp9", "video/x-matroska"),
        ("h264.mov", "h264", "video/quicktime"),
        ("h264.avi", "h264", "video/x-msvideo"),
        ("UPPER.MP4", "h264", "video/mp4"),
    ],
)
def test_each_codec_and_container_is_uploaded_with_its_fields(
    pipeline: Build, tmp_path: Path, name: str, codec: str, content_type: str
) -> None:
    run = pipeline(
        defaults={"tags": ["home", "cam"], "camera_model": "Door Cam", "retain_original_video": False},
        folders=[
            {
                "path": str(tmp_path / "watched"),
                "unique_id": "front-door",
                "tags": ["cam", "outdoor"],
                "latitude": 51.5,
                "longitude": "-0.12",
                "callback": "http://127.0.0.1:9/cb",
            }
        ],
    ).start()
    video = write_video(tmp_path / "watched" / name, codec=codec, metadata={"creation_time": "2024-05-06T07:08:09Z"})
    row = run.wait_state(video, UPLOADED)
    assert row.video_no and row.video_no.startswith("VI")
    (received,) = run.sandbox.received()
    assert received.video_no == row.video_no
    assert received.filename == name
    assert received.content_type == content_type
    assert received.sha256 == sha256(video)
    assert received.unique_id == "front-door"
    assert received.folder_tags == ["home", "cam", "outdoor"]
    assert received.tags[-1] == identity_tag(row.fingerprint or "")
    assert received.fields["camera_model"] == ["Door Cam"]
    assert received.fields["latitude"] == ["51.5"] and received.fields["longitude"] == ["-0.12"]
    assert received.fields["retain_original_video"] == ["false"]
    assert received.fields["callback"] == ["http://127.0.0.1:9/cb"]
    if not name.endswith(".avi"):
        taken = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        assert received.fields["datetime_taken"] == [taken]


def test_capture_time_falls_back_to_the_files_mtime(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline()
    video = write_video(tmp_path / "plain.avi")
    os.utime(video, (1_700_000_000, 1_700_000_000))
    shutil.move(video, tmp_path / "watched" / "plain.avi")
    run.start()
    run.wait_state(tmp_path / "watched" / "plain.avi", UPLOADED)
    expected = datetime.fromtimestamp(1_700_000_000).strftime("%Y-%m-%d %H:%M:%S")
    assert run.sandbox.received()[0].fields["datetime_taken"] == [expected]


def test_bad_files_are_rejected_with_reasons_and_never_sent(pipeline: Build, tmp_path: Path) -> None:
    watched = tmp_path / "watched"
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "notes.txt").write_text("not a video")
    (staging / "empty.mp4").write_bytes(b"")
    (staging / "noise.mp4").write_bytes(os.urandom(4096))
    write_video(staging / "old.mp4", codec="mpeg4")
    whole = write_video(tmp_path / "whole.mp4", seconds=2).read_bytes()
    (staging / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    write_video(staging / "silent.mov")
    with (staging / "huge.mp4").open("wb") as huge:
        huge.write(b"\x00\x00\x00\x18ftypisom")
        huge.truncate(3 * 1024**3 + 1)
    audio_folder = tmp_path / "interviews"
    audio_folder.mkdir()
    run = pipeline(
        folders=[
            {"path": str(watched), "unique_id": "a"},
            {"path": str(audio_folder), "unique_id": "b", "require_audio": True},
        ]
    ).start()
    for item in staging.iterdir():
        target = audio_folder if item.name == "silent.mov" else watched
        shutil.move(item, target / item.name)
    expected = {
        watched / "empty.mp4": "file is empty",
        watched / "noise.mp4": "content is not an MP4/MOV, MKV or AVI container",
        watched / "old.mp4": "video codec mpeg4 is not one of h264, hevc, vp9",
        watched / "cut.mp4": "the file is truncated or corrupt",
        audio_folder / "silent.mov": "no audio track, and this folder requires one",
        watched / "huge.mp4": "over the 3 GiB limit",
    }
    for path, reason in expected.items():
        row = run.wait_state(path, REJECTED)
        assert row.error is not None and reason in row.error, (path.name, row.error)
    assert run.sandbox.received() == []
    assert run.row(watched / "notes.txt") is None, "rows are for videos: a note is not even recorded"


def test_a_slow_writer_gives_one_upload_of_the_final_bytes(pipeline: Build, tmp_path: Path) -> None:
    source = write_video(tmp_path / "source.mp4", seconds=3, size=(128, 128))
    data = source.read_bytes()
    run = pipeline(watch={"settle_seconds": 1.0}).start()
    target = tmp_path / "watched" / "growing.mp4"
    pause = threading.Event()
    chunk = max(1, len(data) // 12)
    with target.open("wb") as out:
        for start in range(0, len(data), chunk):
            out.write(data[start : start + chunk])
            out.flush()
            pause.wait(0.3)
    run.wait_state(target, UPLOADED)
    pause.wait(1.0)
    (received,) = run.sandbox.received()
    assert received.sha256 == hashlib.sha256(data).hexdigest()
    assert received.size == len(data)


def test_files_present_before_start_and_moved_in_are_uploaded(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline()
    before = write_video(tmp_path / "watched" / "before.mp4")
    run.start()
    outside = write_video(tmp_path / "outside.mkv", codec="vp9")
    moved = tmp_path / "watched" / "moved.mkv"
    outside.rename(moved)
    run.wait_state(before, UPLOADED)
    run.wait_state(moved, UPLOADED)
    assert run.received_names() == ["before.mp4", "moved.mkv"]


def test_temporary_and_hidden_names_are_ignored_until_renamed(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline().start()
    partial = write_video(tmp_path / "watched" / "clip.mp4.part")
    hidden = write_video(tmp_path / "watched" / ".clip.mp4")
    threading.Event().wait(1.0)
    assert run.row(partial) is None and run.row(hidden) is None
    final = tmp_path / "watched" / "clip.mp4"
    partial.rename(final)
    run.wait_state(final, UPLOADED)
    assert run.received_names() == ["clip.mp4"]


def test_recursive_folders_and_directories_created_with_files(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline(folders=[{"path": str(tmp_path / "watched"), "unique_id": "r", "recursive": True}]).start()
    tree = tmp_path / "day"
    (tree / "hour").mkdir(parents=True)
    write_video(tree / "hour" / "a.mp4")
    write_video(tree / "b.mp4")
    tree.rename(tmp_path / "watched" / "day")
    run.wait_state(tmp_path / "watched" / "day" / "hour" / "a.mp4", UPLOADED)
    run.wait_state(tmp_path / "watched" / "day" / "b.mp4", UPLOADED)


def test_the_rescan_finds_what_was_added_while_the_daemon_was_down(pipeline: Build, tmp_path: Path) -> None:
    first = pipeline().start()
    one = write_video(tmp_path / "watched" / "one.mp4")
    first.wait_state(one, UPLOADED)
    first.stop()
    two = write_video(tmp_path / "watched" / "two.mp4", seconds=2)
    second = pipeline()
    second.start()
    second.wait_state(two, UPLOADED)
    assert second.received_names() == ["one.mp4", "two.mp4"]


def test_rate_limit_storms_5xx_and_resets_end_with_each_file_uploaded_once(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline(upload={"workers": 2})
    run.sandbox.inject("rate_limit", times=3)
    run.sandbox.inject("server_error", times=2, status=503)
    run.sandbox.inject("reset", times=2)
    run.sandbox.inject("rate_limit", times=2, http_status=429, retry_after="1")
    names = [f"clip{n}.mp4" for n in range(6)]
    for n, name in enumerate(names):
        write_video(tmp_path / "watched" / name, seconds=1 + n / 10)
    run.start()
    for name in names:
        run.wait_state(tmp_path / "watched" / name, UPLOADED, timeout=40)
    assert run.received_names() == sorted(names)
    codes = [r.code for r in run.sandbox.requests()]
    assert codes.count("0429") >= 5
    assert run.ledger.counts()[FAILED] == 0


def test_requests_never_exceed_the_configured_rate_while_retrying(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline(upload={"rate_per_second": 5, "workers": 3})
    run.sandbox.inject("server_error", times=4)
    for n in range(8):
        write_video(tmp_path / "watched" / f"v{n}.mp4", seconds=1 + n / 10)
    run.start()
    for n in range(8):
        run.wait_state(tmp_path / "watched" / f"v{n}.mp4", UPLOADED, timeout=60)
    arrivals = sorted(r.arrived_at for r in run.sandbox.requests())
    assert len(arrivals) == 12, "8 uploads and 4 retries, each paced"
    # Three uploaders and four retries without a shared pace would arrive together, a few milliseconds apart.
    # The arrival times are the sandbox's, taken by a thread that a busy host may schedule late by tens of
    # milliseconds, so half an interval is the bound here; the exact spacing is proven with an injected clock in
    # test_pacing.py, and over 1,000 real requests by bench/pacing.py.
    assert min(later - earlier for earlier, later in itertools.pairwise(arrivals)) >= 0.5 / 5


@pytest.mark.parametrize("sandbox", DIALECTS, indirect=True)
@pytest.mark.parametrize(
    ("state", "words"),
    [
        ("insufficient_balance", "the account has no points left: top it up"),
        ("disabled", "the developer account is disabled"),
        ("permission_denied", "the API denied permission to this key"),
        ("bad_key", "the API key was refused"),
        ("indexing_cap", "the account reached its indexing cap"),
    ],
)
def test_account_refusals_pause_everything_never_fail_a_file_and_resume_by_themselves(
    pipeline: Build, tmp_path: Path, sandbox: Sandbox, state: str, words: str
) -> None:
    if sandbox.dialect == "v2" and state == "permission_denied":
        words = "the developer account is disabled"
    run = pipeline(upload={"workers": 2})
    sandbox.set_account(state)
    videos = [write_video(tmp_path / "watched" / f"v{n}.mp4", seconds=1 + n / 10) for n in range(3)]
    run.start()
    pause = wait_until(run.ledger.pause, what="the pause")
    assert pause.kind == "account" and pause.reason.startswith(words), pause.reason
    wait_until(lambda: len(sandbox.requests()) >= 2, what="a trial after the first refusal")
    assert all(row.state not in (FAILED, UPLOADED) for row in run.ledger.rows())
    refused = len(sandbox.requests())
    assert refused <= 4, "a paused account must not be hammered"
    sandbox.set_account("ok")
    for video in videos:
        run.wait_state(video, UPLOADED)
    wait_until(lambda: run.ledger.pause() is None, what="the pause to clear")
    assert run.ledger.counts()[FAILED] == 0


def test_an_invalid_field_fails_the_file_with_the_servers_message(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline()
    run.sandbox.inject("invalid_field", msg="camera_model is too long")
    video = write_video(tmp_path / "watched" / "a.mp4")
    run.start()
    row = run.wait_state(video, FAILED)
    assert row.error is not None and "camera_model is too long" in row.error


def test_transient_failures_are_scheduled_in_the_ledger(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline()
    run.sandbox.inject("server_error", times=1, status=502)
    video = write_video(tmp_path / "watched" / "a.mp4")
    run.start()
    row = run.wait_state(video, RETRYING, UPLOADED)
    final = run.wait_state(video, UPLOADED)
    assert final.attempts == 2 or row.state == UPLOADED


def test_touching_an_uploaded_file_does_not_send_it_again(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline(watch={"rescan_seconds": 1}).start()
    video = write_video(tmp_path / "watched" / "a.mp4")
    first = run.wait_state(video, UPLOADED)
    os.utime(video)
    wait_until(lambda: (r := run.row(video)) and r.mtime_ns == video.stat().st_mtime_ns and r.state == UPLOADED)
    threading.Event().wait(1.5)
    row = run.row(video)
    assert row is not None and row.state == UPLOADED and row.video_no == first.video_no
    assert len(run.sandbox.received()) == 1


def test_new_content_at_an_uploaded_path_is_uploaded_as_a_new_video(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline().start()
    video = write_video(tmp_path / "watched" / "a.mp4", seconds=1)
    first = run.wait_state(video, UPLOADED)
    replacement = write_video(tmp_path / "b.mp4", seconds=2)
    replacement.replace(video)
    wait_until(lambda: len(run.sandbox.received()) == 2, what="the second upload")
    second = run.wait_state(video, UPLOADED)
    assert second.video_no != first.video_no


def test_a_copy_in_the_same_scope_is_not_uploaded_twice(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline().start()
    video = write_video(tmp_path / "watched" / "a.mp4")
    first = run.wait_state(video, UPLOADED)
    copy = tmp_path / "watched" / "copy-of-a.mp4"
    shutil.copy(video, copy)
    row = run.wait_state(copy, UPLOADED)
    assert row.video_no == first.video_no and row.error and "same content" in row.error
    assert len(run.sandbox.received()) == 1


def test_run_once_exits_when_only_future_retries_remain(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline(watch={"settle_seconds": 0})
    write_video(tmp_path / "watched" / "a.mp4")
    write_video(tmp_path / "watched" / "b.mp4", seconds=2)
    run.start(once=True)
    assert run.thread is not None
    run.thread.join(timeout=30)
    assert not run.thread.is_alive() and run.exit_code == 0
    assert run.received_names() == ["a.mp4", "b.mp4"]


class StallingApi:
    """An upload endpoint that stops reading the first body halfway until the test says go.

    Later requests are read whole and answered with success, so a test can change the file while the
    first upload is in flight and then watch what the daemon sends next.
    """

    def __init__(self) -> None:
        self.stalled = threading.Event()
        self.go = threading.Event()
        self.bodies: list[tuple[int, int]] = []
        self.server = RawServer(self.handle, receive_buffer=16384)
        self.url = self.server.url

    def handle(self, connection: socket.socket) -> None:
        head = read_request_head(connection)
        header_end = head.index(b"\r\n\r\n") + 4
        length = int(re.search(rb"(?i)content-length: *(\d+)", head[:header_end]).group(1))  # type: ignore[union-attr]
        received = len(head) - header_end
        first = not self.stalled.is_set()
        if first:
            self.stalled.set()
            self.go.wait(30)
        while received < length:
            chunk = connection.recv(1 << 20)
            if not chunk:
                break
            received += len(chunk)
        self.bodies.append((received, length))
        if received < length:
            return
        body = json.dumps({"code": "0000", "msg": "success", "data": {"videoNo": f"VI{len(self.bodies)}"}}).encode()
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        connection.sendall(body)

    def complete_bodies(self) -> list[int]:
        return [length for received, length in self.bodies if received == length]


@pytest.mark.parametrize("change", ["grow", "shrink", "replace", "delete", "rewrite keeping the mtime"])
def test_a_file_changed_mid_upload_never_yields_a_mixed_or_truncated_upload(
    pipeline: Build, tmp_path: Path, change: str
) -> None:
    api = StallingApi()
    run = pipeline(api={"base_url": api.url}, watch={"settle_seconds": 0.5})
    video = write_video(tmp_path / "staging.mp4", seconds=1, faststart=True)
    faststart_padding(video, 24 << 20)
    target = tmp_path / "watched" / "big.mp4"
    video.rename(target)
    run.start()
    try:
        wait_until(api.stalled.is_set, what="the upload to start")
        if change == "grow":
            faststart_padding(target, 25 << 20)
        elif change == "shrink":
            os.truncate(target, 1 << 20)
        elif change == "replace":
            replacement = write_video(tmp_path / "other.mp4", seconds=2)
            replacement.replace(target)
        elif change == "rewrite keeping the mtime":
            # rsync --inplace -t, or cp -p over the file: new bytes, the same size, the old mtime.
            before = target.stat()
            other = write_video(tmp_path / "other.mp4", seconds=2, faststart=True)
            faststart_padding(other, before.st_size)
            with target.open("r+b") as rewrite:
                rewrite.write(other.read_bytes())
            os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
        else:
            target.unlink()
    finally:
        api.go.set()
    if change == "delete":
        run.wait_state(target, "gone")
        assert api.complete_bodies() == []
    elif change == "shrink":
        row = run.wait_state(target, REJECTED)
        assert api.complete_bodies() == [] and row.error
    elif change == "rewrite keeping the mtime":
        row = run.wait_state(target, UPLOADED)
        (complete,) = api.complete_bodies()
        assert row.fingerprint is not None and row.ctime_ns == target.stat().st_ctime_ns
        assert api.bodies[-1][0] == complete, "only the rewritten file went up whole"
    else:
        row = run.wait_state(target, UPLOADED)
        (complete,) = api.complete_bodies()
        assert complete > row.size
        assert row.size == target.stat().st_size
    assert api.bodies[0][0] < api.bodies[0][1], "the first body must never be completed"
    api.server.close()


def test_uploads_pause_before_the_indexing_cap(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline(upload={"max_indexing": 2})
    for n in range(3):
        write_video(tmp_path / "watched" / f"v{n}.mp4", seconds=1 + n / 10)
    run.start()
    wait_until(lambda: run.ledger.counts()[UPLOADED] == 2, what="two uploads")
    pause = wait_until(run.ledger.pause, what="the pause")
    assert pause.kind == "indexing_window" and "upload.max_indexing is 2" in pause.reason
    threading.Event().wait(1.0)
    assert run.ledger.counts()[UPLOADED] == 2 and len(run.sandbox.received()) == 2


def test_symlinks_fifos_sockets_and_directories_named_like_videos_are_skipped(pipeline: Build, tmp_path: Path) -> None:
    watched = tmp_path / "watched"
    run = pipeline()
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = write_video(outside / "secret.mp4")
    os.symlink(secret, watched / "link.mp4")
    os.mkfifo(watched / "pipe.mp4")
    (watched / "folder.mp4").mkdir()
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(watched / "sock.mp4"))
    good = write_video(watched / "good.mp4", seconds=2)
    run.start()
    run.wait_state(good, UPLOADED)
    threading.Event().wait(0.5)
    unix.close()
    assert run.received_names() == ["good.mp4"]
    assert {row.path.name for row in run.ledger.rows()} == {"good.mp4"}


def test_a_symlinked_directory_inside_the_tree_is_not_followed(pipeline: Build, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    write_video(outside / "private.mp4")
    run = pipeline(folders=[{"path": str(tmp_path / "watched"), "unique_id": "r", "recursive": True}])
    os.symlink(outside, tmp_path / "watched" / "sneaky")
    good = write_video(tmp_path / "watched" / "good.mp4", seconds=2)
    run.start()
    run.wait_state(good, UPLOADED)
    write_video(outside / "later.mp4", seconds=3)
    threading.Event().wait(1.0)
    assert run.received_names() == ["good.mp4"]


@pytest.mark.parametrize("policy", ["upload", "reject"])
def test_hard_links_follow_the_configured_policy(pipeline: Build, tmp_path: Path, policy: str) -> None:
    run = pipeline(watch={"hardlinks": policy})
    elsewhere = write_video(tmp_path / "elsewhere.mp4")
    linked = tmp_path / "watched" / "linked.mp4"
    os.link(elsewhere, linked)
    run.start()
    if policy == "upload":
        run.wait_state(linked, UPLOADED)
    else:
        row = run.wait_state(linked, REJECTED)
        assert row.error == "the file has 2 hard links, and watch.hardlinks is reject"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_files_of_other_owners_follow_the_configured_policy(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline(watch={"other_owners": "reject"})
    theirs = write_video(tmp_path / "watched" / "theirs.mp4")
    os.chown(theirs, 12345, 12345)
    mine = write_video(tmp_path / "watched" / "mine.mp4", seconds=2)
    run.start()
    run.wait_state(mine, UPLOADED)
    row = run.wait_state(theirs, REJECTED)
    assert row.error is not None and "belongs to uid 12345" in row.error


def test_after_upload_delete_and_move_run_in_the_daemon(pipeline: Build, tmp_path: Path) -> None:
    done = tmp_path / "done"
    done.mkdir()
    (tmp_path / "moved").mkdir()
    run = pipeline(
        folders=[
            {"path": str(tmp_path / "watched"), "unique_id": "a", "after_upload": "delete"},
            {"path": str(tmp_path / "moved"), "unique_id": "b", "after_upload": "move", "move_to": str(done)},
        ]
    ).start()
    deleted = write_video(tmp_path / "watched" / "gone.mp4")
    moved = write_video(tmp_path / "moved" / "kept.mp4", seconds=2)
    wait_until(lambda: not deleted.exists() and (done / "kept.mp4").exists(), what="the delete and the move")
    assert not moved.exists()

    def acted_on(path: Path) -> Row | None:
        row = run.row(path)
        return row if row is not None and row.action is None else None

    for path in (deleted, moved):
        # The ledger hears of an action just after the file system does: wait for it, not for a clock.
        row = wait_until(functools.partial(acted_on, path), what="the actions recorded")
        assert row.state == UPLOADED and row.video_no
    # A moved or deleted file is never taken for a new one: the next full rescan changes nothing.
    assert run.daemon is not None
    run.daemon.scanner.scan_all()
    assert len(run.sandbox.received()) == 2 and run.ledger.counts()["pending"] == 0


def test_indexing_results_arrive_by_polling(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline(indexing={"poll_seconds": 0.3})
    run.sandbox.fail_next_parse("the video has no decodable frames")
    bad = write_video(tmp_path / "watched" / "bad.mp4")
    run.start()
    failed = run.wait_state(bad, "index_failed")
    assert failed.error == "the video has no decodable frames"
    good = write_video(tmp_path / "watched" / "good.mp4", seconds=2)
    run.wait_state(good, "indexed")


def test_indexing_results_arrive_by_callback(pipeline: Build, tmp_path: Path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    run = pipeline(indexing={"listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}/memories"})
    video = write_video(tmp_path / "watched" / "a.mp4")
    run.start()
    run.wait_state(video, "indexed")
    (callback,) = run.sandbox.received()[0].fields["callback"]
    assert callback.startswith(f"http://127.0.0.1:{port}/memories/") and len(callback) > 40


def test_a_name_that_is_not_utf8_goes_up_with_a_lossless_escape_and_is_kept_exactly(
    pipeline: Build, tmp_path: Path
) -> None:
    run = pipeline(watch={"settle_seconds": 0})
    name = b"caf\xe9 100%.mp4"
    video = write_video(tmp_path / "clip.mp4")
    target = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path / "watched"), name)))
    video.rename(target)
    run.start(once=True)
    assert run.thread is not None
    run.thread.join(timeout=60)
    assert not run.thread.is_alive() and run.exit_code == 0
    (received,) = run.sandbox.received()
    assert received.filename == "caf%E9 100%25.mp4"
    (row,) = run.ledger.rows()
    assert os.fsencode(row.path).endswith(name) and row.state == UPLOADED


def test_an_error_inside_the_daemon_never_leaves_a_file_uploading(
    pipeline: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> list[tuple[str, str]]:
        raise UnicodeEncodeError("utf-8", "x", 0, 1, "a bug in the daemon")

    monkeypatch.setattr("memories_ingest.worker.upload_fields", broken)
    run = pipeline().start()
    video = write_video(tmp_path / "watched" / "a.mp4")
    row = run.wait_state(video, FAILED, timeout=60)
    assert row.error is not None and "an error inside the daemon: UnicodeEncodeError" in row.error
    assert run.ledger.counts()["uploading"] == 0


def test_a_file_not_readable_yet_is_tried_again_and_uploaded_once_it_is(tmp_path: Path, sandbox: Sandbox) -> None:
    config = daemon_config(tmp_path, sandbox)
    video = write_video(tmp_path / "watched" / "late.mp4")
    video.chmod(0o000)
    command = [sys.executable, "-m", "memories_ingest.cli", "run", "-c", str(config)]
    if os.geteuid() == 0:
        # root reads anything: without these capabilities, file permissions apply to it too.
        os.chown(video, 12345, 12345)
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    daemon = spawned(
        subprocess.Popen(command, env={**os.environ, "MEMORIES_API_KEY": API_KEY}, stderr=subprocess.PIPE, text=True)
    )
    try:
        refused = wait_until(
            lambda: (row := row_of(tmp_path, video)) and "cannot be read now" in (row.error or "") and row,
            30,
            "the read error",
        )
        assert refused.state == "pending" and sandbox.received() == []
        video.chmod(0o644)
        wait_until(lambda: (row := row_of(tmp_path, video)) and row.state == UPLOADED, 60, "the upload once readable")
    finally:
        daemon.terminate()
        daemon.communicate(timeout=30)
    assert len(sandbox.received()) == 1


def test_duplicate_refusals_are_checked_with_list_videos_and_backed_off(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline()
    run.sandbox.inject("answer", times=3, name="duplicate")
    video = write_video(tmp_path / "watched" / "a.mp4")
    run.start()
    row = run.wait_state(video, UPLOADED, timeout=60)
    assert [record.code for record in run.sandbox.requests()] == ["0409", "0409", "0409", "0000"]
    assert row.attempts == 4, "each refused send counts, so that the wait before the next one grows"
    assert len(run.sandbox.list_queries()) >= 3, "list_videos is asked before each send again"
