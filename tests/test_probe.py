from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import av
import pytest

from memories_ingest import probe
from memories_ingest.probe import (
    MAX_BYTES,
    MediaInfo,
    Rejection,
    check_header,
    check_name,
    content_type_for,
    iter_top_level_boxes,
    parse_creation_time,
    probe_fd,
    probe_path,
)
from memories_ingest.samples import faststart_padding

MakeVideo = Callable[..., Path]
NOT_A_CONTAINER = "content is not an MP4/MOV, MKV or AVI container"
CAMERA_TAGS = {"creation_time": "2024-05-06T07:08:09.000000Z", "make": "Acme", "model": "Cam 1"}


@pytest.fixture
def open_fd(tmp_path: Path) -> Iterator[Callable[[Path], int]]:
    opened: list[int] = []

    def open_read_only(path: Path) -> int:
        opened.append(os.open(path, os.O_RDONLY))
        return opened[-1]

    yield open_read_only
    for fd in opened:
        os.close(fd)


def rejection_of(path: Path, *, require_audio: bool = False) -> str:
    with pytest.raises(Rejection) as caught:
        probe_path(path, require_audio=require_audio)
    return str(caught.value)


@pytest.mark.parametrize(
    ("name", "codec", "container"),
    [
        ("clip.mp4", "h264", "mov,mp4,m4a,3gp,3g2,mj2"),
        ("clip.mp4", "hevc", "mov,mp4,m4a,3gp,3g2,mj2"),
        ("clip.mkv", "vp9", "matroska,webm"),
        ("clip.mov", "h264", "mov,mp4,m4a,3gp,3g2,mj2"),
        ("clip.avi", "h264", "avi"),
        ("CLIP.MP4", "h264", "mov,mp4,m4a,3gp,3g2,mj2"),
    ],
)
def test_accepts_each_codec_and_container(make_video: MakeVideo, name: str, codec: str, container: str) -> None:
    path = make_video(name, codec=codec, audio=True, seconds=2, size=(96, 64))

    info = probe_path(path, require_audio=True)

    assert (info.container, info.video_codec, info.width, info.height) == (container, codec, 96, 64)
    assert info.audio_codec in ("aac", "mp2")
    assert info.duration == pytest.approx(2.0, abs=0.1)
    assert check_name(path) is None


@pytest.mark.parametrize("name", ["clip.mp4", "clip.mov", "clip.mkv"])
def test_reads_creation_time_and_passes_tags_through(make_video: MakeVideo, name: str) -> None:
    info = probe_path(make_video(name, metadata=CAMERA_TAGS))

    assert info.creation_time == datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    assert info.tags["make"] == "Acme"
    assert info.tags["model"] == "Cam 1"
    assert all(key == key.lower() for key in info.tags)


def test_media_info_survives_json(make_video: MakeVideo) -> None:
    info = probe_path(make_video(metadata=CAMERA_TAGS, audio=True))

    assert MediaInfo.from_json(json.loads(json.dumps(info.to_json()))) == info


def test_content_type_and_name_checks() -> None:
    assert content_type_for("a/b/Clip.MKV") == "video/x-matroska"
    assert content_type_for("notes.txt") is None
    assert check_name("holiday.MoV") is None
    assert check_name("notes.txt") == "extension .txt is not a video extension (.avi, .mkv, .mov, .mp4)"
    assert check_name("README") == "the name has no extension; videos end in .avi, .mkv, .mov, .mp4"


def test_rejects_an_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.touch()

    assert rejection_of(empty) == "file is empty"


def test_rejects_random_bytes_named_mp4(tmp_path: Path) -> None:
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(random.Random(7).randbytes(4096))

    assert rejection_of(noise) == NOT_A_CONTAINER


@pytest.mark.parametrize("name", ["old.avi", "old.mp4"])
def test_rejects_mpeg4_part_2_video(make_video: MakeVideo, name: str) -> None:
    assert rejection_of(make_video(name, codec="mpeg4")) == "video codec mpeg4 is not one of h264, hevc, vp9"


def test_rejects_a_file_without_video(tmp_path: Path) -> None:
    sound_only = tmp_path / "sound.mkv"
    with av.open(sound_only, "w", format="matroska") as output:
        stream = output.add_stream("aac", rate=48_000)
        silence = av.AudioFrame(format="fltp", layout="stereo", samples=1024)
        silence.sample_rate = 48_000
        for plane in silence.planes:
            plane.update(bytes(plane.buffer_size))
        output.mux(stream.encode(silence))
        output.mux(stream.encode(None))

    assert rejection_of(sound_only) == "no video stream"


@pytest.mark.parametrize(
    ("name", "faststart", "claim"),
    [
        ("cut.mp4", True, "the mdat box ends"),
        ("cut.mp4", False, "the mdat box ends"),
        ("cut.mov", True, "the mdat box ends"),
        ("cut.mkv", False, "the Matroska segment ends"),
        ("cut.avi", False, "the RIFF chunk ends"),
    ],
)
def test_rejects_a_file_cut_in_half(make_video: MakeVideo, name: str, faststart: bool, claim: str) -> None:
    path = make_video(name, seconds=4, audio=True, faststart=faststart)
    size = path.stat().st_size
    os.truncate(path, size // 2)

    assert rejection_of(path).startswith(f"the file is truncated or corrupt: {claim} at byte ")


def test_rejects_a_file_whose_pictures_are_garbage(make_video: MakeVideo) -> None:
    path = make_video("garbled.mp4", faststart=True)
    fd = os.open(path, os.O_RDWR)
    try:
        media = next(box for box in iter_top_level_boxes(fd, os.fstat(fd).st_size) if box.kind == "mdat")
        os.pwrite(fd, b"\xff" * (media.end - media.start - 8), media.start + 8)
    finally:
        os.close(fd)

    assert rejection_of(path) == "the file is truncated or corrupt: Error splitting the input into NAL units."


def test_rejects_a_movie_without_tracks(tmp_path: Path) -> None:
    empty_movie = tmp_path / "empty.mov"
    empty_movie.write_bytes(b"\0\0\0\x14ftypqt  \0\0\2\0qt  " + b"\0\0\0\x08moov")

    assert rejection_of(empty_movie) == "no video stream"


def test_requires_audio_only_when_asked(make_video: MakeVideo) -> None:
    silent = make_video("silent.mp4")

    assert probe_path(silent).audio_codec is None
    assert rejection_of(silent, require_audio=True) == "no audio track, and this folder requires one"


def test_rejects_over_3_gib_without_running_the_probe(make_video: MakeVideo, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_probe(*_: object, **__: object) -> MediaInfo:
        raise AssertionError("the probe ran on a file over the limit")

    monkeypatch.setattr(probe, "probe_fd", must_not_probe)
    huge = make_video("huge.mp4")
    os.truncate(huge, int(3.2 * 1024**3))
    assert rejection_of(huge) == "file is 3.2 GiB, over the 3 GiB limit"

    os.truncate(huge, MAX_BYTES + 1)
    assert rejection_of(huge) == "file is 3.0 GiB, over the 3 GiB limit"


def test_accepts_a_faststart_file_padded_to_exactly_3_gib(make_video: MakeVideo) -> None:
    padded = faststart_padding(make_video("big.mp4", faststart=True), MAX_BYTES)

    assert padded.stat().st_size == MAX_BYTES
    assert probe_path(padded).video_codec == "h264"


def test_padding_past_4_gib_uses_a_64_bit_box(make_video: MakeVideo) -> None:
    padded = faststart_padding(make_video("bigger.mp4", faststart=True), 5 * 1024**3)

    fd = os.open(padded, os.O_RDONLY)
    try:
        boxes = list(iter_top_level_boxes(fd, os.fstat(fd).st_size))
        padding_header = os.pread(fd, 16, boxes[-1].start)
    finally:
        os.close(fd)
    assert [box.kind for box in boxes][-2:] == ["mdat", "free"]
    assert boxes[-1].end == 5 * 1024**3
    assert padding_header[:8] == b"\0\0\0\1free"


def test_dense_padding_stays_a_valid_video(make_video: MakeVideo) -> None:
    padded = faststart_padding(make_video("dense.mov", faststart=True), 3 << 20, sparse=False)

    assert padded.stat().st_size == 3 << 20
    assert padded.stat().st_blocks * 512 >= 3 << 20
    assert probe_path(padded).container == "mov,mp4,m4a,3gp,3g2,mj2"


def test_padding_refuses_a_file_whose_moov_comes_last(make_video: MakeVideo) -> None:
    with pytest.raises(ValueError, match="not a faststart MP4"):
        faststart_padding(make_video("slow.mp4"), 1 << 20)


def test_never_follows_a_playlist_named_mp4(tmp_path: Path, open_fd: Callable[[Path], int]) -> None:
    # A segment that is a FIFO: had anything opened it, the probe would hang until its timeout.
    segment = tmp_path / "segment.ts"
    os.mkfifo(segment)
    playlist = tmp_path / "playlist.mp4"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{segment}\n#EXT-X-ENDLIST\n")

    assert rejection_of(playlist) == NOT_A_CONTAINER
    with pytest.raises(Rejection, match=NOT_A_CONTAINER):
        probe_fd(open_fd(playlist), timeout=10)


def test_a_fifo_named_mp4_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "x.mp4"
    os.mkfifo(fifo)
    # Should the probe open the FIFO after all, a writer turns up and the test fails instead of hanging.
    rescue = threading.Timer(5, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))
    rescue.start()
    started = time.monotonic()
    try:
        assert rejection_of(fifo) == "not a regular file (it is a FIFO)"
    finally:
        rescue.cancel()
    assert time.monotonic() - started < 1


def test_rejects_a_directory_and_a_symlink(tmp_path: Path, make_video: MakeVideo) -> None:
    directory = tmp_path / "x.mp4"
    directory.mkdir()
    link = tmp_path / "link.mp4"
    link.symlink_to(make_video("real.mp4"))

    assert rejection_of(directory) == "not a regular file (it is a directory)"
    assert rejection_of(link) == "not a regular file (it is a symbolic link)"


def test_probe_leaves_the_file_offset_alone(make_video: MakeVideo, open_fd: Callable[[Path], int]) -> None:
    fd = open_fd(make_video())
    os.lseek(fd, 123, os.SEEK_SET)

    probe_fd(fd)

    assert os.lseek(fd, 0, os.SEEK_CUR) == 123


def test_check_header_reads_without_moving_the_offset(make_video: MakeVideo, open_fd: Callable[[Path], int]) -> None:
    path = make_video("clip.mkv", codec="vp9")
    fd = open_fd(path)
    os.lseek(fd, 5, os.SEEK_SET)

    check_header(fd, path.stat().st_size)

    assert os.lseek(fd, 0, os.SEEK_CUR) == 5


def test_a_probe_over_its_timeout_is_rejected_and_the_daemon_lives_on(
    make_video: MakeVideo, open_fd: Callable[[Path], int]
) -> None:
    fd = open_fd(make_video())

    with pytest.raises(Rejection, match=r"^probe timed out after 0\.05 s$"):
        probe_fd(fd, timeout=0.05)

    assert probe_fd(fd).video_codec == "h264"


def test_a_memory_limit_too_small_for_ffmpeg_is_a_rejection(
    make_video: MakeVideo, open_fd: Callable[[Path], int]
) -> None:
    with pytest.raises(Rejection):
        probe_fd(open_fd(make_video()), memory_bytes=32 << 20)


def fake_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Stand a shell script in for the Python child, to act out what a hostile file could do to it."""
    executable = tmp_path / "fake-python"
    executable.write_text("#!/bin/sh\n" + script)
    executable.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(executable))


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_timeout_kills_the_whole_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_video: MakeVideo, open_fd: Callable[[Path], int]
) -> None:
    pids = tmp_path / "pids"
    fake_probe(tmp_path, monkeypatch, f"sleep 60 >/dev/null 2>&1 &\necho $$ $! > {pids}\nwait\n")

    with pytest.raises(Rejection, match=r"^probe timed out after 1 s$"):
        probe_fd(open_fd(make_video()), timeout=1)

    # SIGKILL closes a process's pipes a moment before it finishes dying: allow that moment.
    deadline = time.monotonic() + 5
    survivors = [int(pid) for pid in pids.read_text().split()]
    while survivors and time.monotonic() < deadline:
        time.sleep(0.01)
        survivors = [pid for pid in survivors if is_running(pid)]
    assert survivors == []


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ("kill -SEGV $$\n", "the file crashed the probe (signal 11, SIGSEGV)"),
        ("kill -XCPU $$\n", "probing needed more than 60 s of CPU time"),
        ("echo 'Traceback: boom' >&2\nexit 3\n", "the probe failed (exit status 3): Traceback: boom"),
        ("echo not json\n", "the probe failed (exit status 0): no error output"),
    ],
)
def test_a_dead_or_garbled_child_is_a_rejection(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_video: MakeVideo,
    open_fd: Callable[[Path], int],
    script: str,
    reason: str,
) -> None:
    fake_probe(tmp_path, monkeypatch, script)

    with pytest.raises(Rejection) as caught:
        probe_fd(open_fd(make_video()))

    assert str(caught.value) == reason


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("2024-05-06T07:08:09.000000Z", datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)),
        ("2024-05-06T07:08:09.5Z", datetime(2024, 5, 6, 7, 8, 9, 500_000, tzinfo=timezone.utc)),
        ("2024-05-06T07:08:09.123456789Z", datetime(2024, 5, 6, 7, 8, 9, 123_456, tzinfo=timezone.utc)),
        ("2024-05-06 07:08:09", datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)),
        ("2024-05-06T09:08:09+02:00", datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)),
        ("2024-05-06T09:08:09+0200", datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)),
        ("2024-05-06T01:38:09.250-0530", datetime(2024, 5, 6, 7, 8, 9, 250_000, tzinfo=timezone.utc)),
        ("2024-05-06", datetime(2024, 5, 6, tzinfo=timezone.utc)),
        ("yesterday", None),
        ("", None),
    ],
)
def test_parse_creation_time(tag: str, expected: datetime | None) -> None:
    assert parse_creation_time(tag) == expected
