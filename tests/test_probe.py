from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import av
import pytest

from memories_ingest import probe, prober
from memories_ingest.api import MAX_FILE_BYTES
from memories_ingest.inspector import iter_top_level_boxes
from memories_ingest.metadata import parse_creation_time
from memories_ingest.probe import (
    MediaInfo,
    Rejection,
    check_header,
    check_name,
    content_type_for,
    probe_fd,
    probe_path,
)
from memories_ingest.samples import faststart_padding

from conftest import wait_until

MakeVideo = Callable[..., Path]
NOT_A_CONTAINER = "content is not an MP4/MOV, MKV or AVI container"
CAMERA_TAGS = {"creation_time": "2024-05-06T07:08:09.000000Z", "make": "Acme", "model": "Cam 1"}
PYTHON = sys.executable
# Run in place of the zygote: the real fork server, whose children hang, leaving a `sleep` in their
# group, on a file whose name has "hang" in it, and probe any other file for real.
HANGING_ZYGOTE = """
import os, subprocess, sys, time
from memories_ingest import inspector, prober

probe_for_real = inspector._probe_in_child


def hang_on_request(fd, *, require_audio):
    if "hang" in os.readlink(f"/proc/self/fd/{fd}"):
        subprocess.Popen(["sleep", "60"])
        time.sleep(60)
    return probe_for_real(fd, require_audio=require_audio)


inspector._probe_in_child = hang_on_request
sys.exit(prober.main(sys.argv[3:]))
"""


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

    os.truncate(huge, MAX_FILE_BYTES + 1)
    assert rejection_of(huge) == "file is 3.0 GiB, over the 3 GiB limit"


def test_accepts_a_faststart_file_padded_to_exactly_3_gib(make_video: MakeVideo) -> None:
    padded = faststart_padding(make_video("big.mp4", faststart=True), MAX_FILE_BYTES)

    assert padded.stat().st_size == MAX_FILE_BYTES
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


@pytest.mark.usefixtures("hanging_zygote")
def test_a_probe_over_its_timeout_is_rejected_and_the_daemon_lives_on(
    make_video: MakeVideo, open_fd: Callable[[Path], int]
) -> None:
    fd = open_fd(make_video())
    assert probe_fd(fd).video_codec == "h264"

    with pytest.raises(Rejection, match=r"^probe timed out after 0\.05 s$"):
        probe_fd(open_fd(make_video("hang.mp4")), timeout=0.05)

    assert probe_fd(fd).video_codec == "h264"


def test_a_memory_limit_too_small_for_ffmpeg_is_a_rejection(
    make_video: MakeVideo, open_fd: Callable[[Path], int]
) -> None:
    with pytest.raises(Rejection):
        probe_fd(open_fd(make_video()), memory_bytes=32 << 20)


@pytest.fixture
def own_prober(monkeypatch: pytest.MonkeyPatch) -> Iterator[prober.Prober]:
    """A zygote for this test alone, started from whatever sys.executable the test sets up.

    The shared zygote is stopped first, so every zygote alive during the test is this test's.
    """
    prober.close()
    own = prober.Prober()
    monkeypatch.setattr(prober, "_shared", own)
    yield own
    own.close()


@pytest.fixture
def hanging_zygote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_prober: prober.Prober) -> None:
    script = tmp_path / "hanging_zygote.py"
    script.write_text(HANGING_ZYGOTE)
    stand_in_for_the_zygote(tmp_path, monkeypatch, f'exec {PYTHON} {script} "$@"')


def stand_in_for_the_zygote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Run a shell script instead of the zygote; any other Python command runs as usual."""
    executable = tmp_path / "python-for-the-zygote"
    executable.write_text(f'#!/bin/sh\nif [ "$2" = memories_ingest.prober ]; then\n{script}\nfi\nexec {PYTHON} "$@"\n')
    executable.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(executable))


def fake_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Stand a shell script in for the Python child, to act out what a hostile file could do to it.

    The script fails as the test's zygote too, and so also plays the child the probe then falls back to.
    """
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


@pytest.mark.usefixtures("own_prober")
def test_timeout_kills_the_whole_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_video: MakeVideo, open_fd: Callable[[Path], int]
) -> None:
    pids = tmp_path / "pids"
    fake_probe(tmp_path, monkeypatch, f"sleep 60 >/dev/null 2>&1 &\necho $$ $! > {pids}\nwait\n")

    with pytest.raises(Rejection, match=r"^probe timed out after 1 s$"):
        probe_fd(open_fd(make_video()), timeout=1)

    # SIGKILL closes a process's pipes a moment before it finishes dying: allow that moment.
    survivors = [int(pid) for pid in pids.read_text().split()]
    wait_until(lambda: not [pid for pid in survivors if is_running(pid)], 20, "every probe process to be gone")


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ("kill -SEGV $$\n", "the file crashed the probe (signal 11, SIGSEGV)"),
        ("kill -XCPU $$\n", "probing needed more than 60 s of CPU time"),
        ("echo 'Traceback: boom' >&2\nexit 3\n", "the probe failed (exit status 3): Traceback: boom"),
        ("echo not json\n", "the probe failed (exit status 0): no error output"),
    ],
)
@pytest.mark.usefixtures("own_prober")
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


def process_status(pid: int) -> tuple[str, int, int] | None:
    """State, parent and session of ``pid``; None once it is gone and reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], int(fields[1]), int(fields[3])


def children_of(parent: int) -> list[int]:
    """The live children of ``parent``."""
    children = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        status = process_status(int(name))
        if status is not None and status[1] == parent and is_running(int(name)):
            children.append(int(name))
    return children


def zygotes_of(daemon: int) -> list[int]:
    return [pid for pid in children_of(daemon) if b"memories_ingest.prober" in command_line(pid)]


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def zygotes() -> list[int]:
    return zygotes_of(os.getpid())


def hanging_child(zygote: int) -> tuple[int, int]:
    """The zygote's one child, once it hangs, and the `sleep` it started."""
    [child] = wait_until(lambda: children_of(zygote), what="the zygote's child")
    [sleeper] = wait_until(lambda: children_of(child), what="the child's sleep")
    return child, sleeper


def in_background(call: Callable[[], MediaInfo]) -> Callable[[], MediaInfo | Exception]:
    """Start ``call`` in a thread; the function returned waits for it, and gives its result or exception."""
    outcome: list[MediaInfo | Exception] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()

    def result() -> MediaInfo | Exception:
        thread.join(60)
        return outcome[0]

    return result


@pytest.mark.usefixtures("own_prober")
def test_one_zygote_serves_every_probe(make_video: MakeVideo, open_fd: Callable[[Path], int]) -> None:
    zygotes_seen = []
    for width in (64, 96, 128):
        info = probe_fd(open_fd(make_video(f"{width}.mp4", size=(width, 48))))
        assert (info.width, info.height) == (width, 48)
        zygotes_seen.append(zygotes())

    [zygote] = zygotes_seen[0]
    assert zygotes_seen == [[zygote]] * 3
    # Forking is safe only from a single thread; and a session of its own keeps a terminal's signals off it.
    assert re.search(r"^Threads:\s+1$", Path(f"/proc/{zygote}/status").read_text(), re.MULTILINE)
    status = process_status(zygote)
    assert status is not None and status[1:] == (os.getpid(), zygote)
    assert os.readlink(f"/proc/{zygote}/cwd") == "/"


@pytest.mark.usefixtures("hanging_zygote")
def test_each_child_has_its_own_session_and_limits_and_only_its_file_open(
    make_video: MakeVideo, open_fd: Callable[[Path], int]
) -> None:
    hang = make_video("hang.mp4")
    result = in_background(lambda: probe_fd(open_fd(hang), cpu_seconds=7, memory_bytes=512 << 20))
    [zygote] = wait_until(zygotes, what="the zygote")
    child, _ = hanging_child(zygote)

    table = Path(f"/proc/{child}/limits").read_text().splitlines()
    limits = {line[:26].strip(): line[26:].split()[:2] for line in table}
    assert limits["Max cpu time"] == ["7", "8"]
    assert limits["Max address space"] == [str(512 << 20)] * 2
    assert limits["Max core file size"] == ["0", "0"]
    assert limits["Max file size"] == ["0", "0"]
    status = process_status(child)
    assert status is not None and status[1:] == (zygote, child)
    assert sorted(os.listdir(f"/proc/{child}/fd")) == ["0", "1", "2", "3"]
    assert os.readlink(f"/proc/{child}/fd/3") == str(hang)

    os.kill(child, signal.SIGKILL)
    assert str(result()) == "the file crashed the probe (signal 9, SIGKILL)"


@pytest.mark.usefixtures("hanging_zygote")
def test_a_timed_out_probe_kills_its_child_and_group_and_nothing_else(
    make_video: MakeVideo, open_fd: Callable[[Path], int]
) -> None:
    assert probe_fd(open_fd(make_video())).video_codec == "h264"
    [zygote] = zygotes()
    hang = open_fd(make_video("hang.mp4"))
    result = in_background(lambda: probe_fd(hang, timeout=1))
    child, sleeper = hanging_child(zygote)

    assert str(result()) == "probe timed out after 1 s"
    assert process_status(child) is None
    wait_until(lambda: not is_running(sleeper), what="the child's sleep to die")
    assert zygotes() == [zygote]
    assert probe_fd(open_fd(make_video("next.mp4"))).video_codec == "h264"


@pytest.mark.usefixtures("hanging_zygote")
@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (signal.SIGSEGV, "the file crashed the probe (signal 11, SIGSEGV)"),
        (signal.SIGXCPU, "probing needed more than 60 s of CPU time"),
    ],
)
def test_a_crashed_child_is_a_rejection_and_other_probes_go_on(
    make_video: MakeVideo, open_fd: Callable[[Path], int], sent: signal.Signals, reason: str
) -> None:
    hang = open_fd(make_video("hang.mp4"))
    result = in_background(lambda: probe_fd(hang))
    [zygote] = wait_until(zygotes, what="the zygote")
    child, sleeper = hanging_child(zygote)

    assert probe_fd(open_fd(make_video("meanwhile.mp4"))).video_codec == "h264"
    os.kill(child, sent)

    assert str(result()) == reason
    wait_until(lambda: not is_running(sleeper), what="the child's sleep to die")
    assert zygotes() == [zygote]
    assert probe_fd(open_fd(make_video("next.mp4"))).video_codec == "h264"


@pytest.mark.usefixtures("own_prober")
def test_a_killed_zygote_is_reaped_and_replaced(make_video: MakeVideo, open_fd: Callable[[Path], int]) -> None:
    fd = open_fd(make_video())
    probe_fd(fd)
    [first] = zygotes()

    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not is_running(first), what="the zygote to die")

    assert probe_fd(fd).video_codec == "h264"
    [second] = zygotes()
    assert second != first
    assert process_status(first) is None


@pytest.mark.usefixtures("hanging_zygote")
def test_zygotes_killed_mid_probe_leave_no_orphans_and_a_new_interpreter_probes(
    make_video: MakeVideo, open_fd: Callable[[Path], int]
) -> None:
    hang = open_fd(make_video("hang.mp4", size=(96, 64)))
    result = in_background(lambda: probe_fd(hang))
    orphans: list[int] = []
    killed: list[int] = []
    # The zygote, then the one started in its place: after that, the probe falls back to a new interpreter.
    for _ in range(2):
        [zygote] = wait_until(lambda: [pid for pid in zygotes() if pid not in killed], what="a zygote")
        orphans += hanging_child(zygote)
        os.kill(zygote, signal.SIGKILL)
        killed.append(zygote)

    info = result()
    assert isinstance(info, MediaInfo)
    assert (info.video_codec, info.width) == ("h264", 96)
    wait_until(lambda: not any(map(is_running, orphans)), what="the orphaned children to die")
    assert [process_status(pid) for pid in killed] == [None, None]


@pytest.mark.usefixtures("own_prober")
def test_without_a_zygote_a_new_interpreter_probes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_video: MakeVideo
) -> None:
    stand_in_for_the_zygote(tmp_path, monkeypatch, "exit 1")

    info = probe_path(make_video(size=(96, 64)))

    assert (info.video_codec, info.width) == ("h264", 96)
    assert zygotes() == []


@pytest.mark.usefixtures("hanging_zygote")
def test_close_leaves_no_process_behind(
    own_prober: prober.Prober, make_video: MakeVideo, open_fd: Callable[[Path], int]
) -> None:
    probe_fd(open_fd(make_video()))
    with pytest.raises(Rejection):
        probe_fd(open_fd(make_video("hang.mp4")), timeout=0.5)
    [zygote] = zygotes()

    own_prober.close()

    assert process_status(zygote) is None
    assert zygotes() == []


@pytest.mark.usefixtures("hanging_zygote")
def test_when_the_daemon_dies_its_zygote_and_children_end(make_video: MakeVideo) -> None:
    daemon_code = "import os, sys; sys.executable = sys.argv[1]; from memories_ingest import probe; "
    daemon_code += "probe.probe_fd(os.open(sys.argv[2], os.O_RDONLY))"
    command = [PYTHON, "-c", daemon_code, sys.executable, str(make_video("hang.mp4"))]

    with subprocess.Popen(command) as daemon:
        [zygote] = wait_until(lambda: zygotes_of(daemon.pid), what="the daemon's zygote")
        child, sleeper = hanging_child(zygote)
        daemon.kill()

    wait_until(lambda: not any(map(is_running, (zygote, child, sleeper))), what="the zygote and its children to end")


@pytest.mark.usefixtures("own_prober")
def test_probes_from_four_threads_each_get_their_own_answer(make_video: MakeVideo) -> None:
    widths = {make_video(f"{width}.mp4", size=(width, 48)): width for width in range(32, 160, 16)}

    def probe_each(first: int) -> dict[Path, int]:
        paths = list(widths)[first:] + list(widths)[:first]
        return {path: probe_path(path).width for path in paths}

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(probe_each, range(4)))

    assert answers == [widths] * 4
    assert len(zygotes()) == 1


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


@pytest.mark.usefixtures("hanging_zygote")
def test_neither_the_zygote_nor_a_child_parsing_a_file_sees_the_key_or_the_credentials(
    make_video: MakeVideo, open_fd: Callable[[Path], int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MEMORIES_API_KEY", "sk-never-in-a-probe")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    result = in_background(lambda: probe_fd(open_fd(make_video("hang.mp4")), timeout=30))
    [zygote] = wait_until(zygotes, what="the zygote")
    child, _ = hanging_child(zygote)
    for pid in (zygote, child):
        environment = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"sk-never-in-a-probe" not in environment
        assert str(tmp_path / "credentials").encode() not in environment
        assert b"NOTIFY_SOCKET" not in environment
        assert b"PATH=" in environment
    os.kill(child, signal.SIGKILL)
    result()
