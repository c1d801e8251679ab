"""Watching that never goes silent: real observers on real files, a real ledger and the real scanner."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent

import memories_ingest.mounts as mounts_module
from memories_ingest.config import Folder, parse
from memories_ingest.ledger import Ledger
from memories_ingest.mounts import read_mountinfo
from memories_ingest.poller import Poller
from memories_ingest.recorder import Recorder, walk
from memories_ingest.scanner import Scanner
from memories_ingest.settler import Settler
from memories_ingest.watcher import INOTIFY, POLLING, Watch, Watcher, watch_mode
from memories_ingest.worker import Events

from conftest import SAMPLE_MOUNTINFO, wait_until

FAST_POLL = 0.3


class Harness:
    """A watcher and the real scanner on one folder under tmp_path, wired as the daemon wires them."""

    def __init__(
        self,
        tmp_path: Path,
        watch: dict[str, Any] | None = None,
        recorder_class: type[Recorder] = Recorder,
        watcher_class: type[Watcher] = Watcher,
    ) -> None:
        self.folder = tmp_path / "watched"
        self.folder.mkdir(exist_ok=True)
        self.config = parse(
            {
                "ledger": str(tmp_path / "ledger.db"),
                "watch": {"settle_seconds": 0, "rescan_seconds": 60, "poll_seconds": FAST_POLL, **(watch or {})},
                "folders": [{"path": str(self.folder), "unique_id": "cams", "recursive": True}],
            },
            tmp_path / "c.yaml",
        )
        self.ledger = Ledger(tmp_path / "ledger.db")
        self.recorder = recorder_class(self.config, self.ledger, threading.Event())
        self.requests: list[Path | None] = []
        self.stop = threading.Event()
        self.watcher = watcher_class(self.config, self.recorder, self.request)
        self.scanner = Scanner(stop=self.stop, config=self.config, recorder=self.recorder, watcher=self.watcher)
        self.thread = threading.Thread(target=self.scanner.run, name="scanner-under-test", daemon=True)

    def request(self, path: Path | None) -> None:
        self.requests.append(path)
        self.scanner.request(path)

    def start(self) -> Harness:
        self.watcher.start()
        self.thread.start()
        wait_until(self.scanner.first_scan_done.is_set, 10, "the first scan")
        return self

    def recorded(self, path: Path) -> bool:
        return self.ledger.get(path) is not None

    def wait_recorded(self, *paths: Path) -> None:
        for path in paths:
            wait_until(partial(self.recorded, path), 10, f"{path.name} to be recorded")

    def recorded_paths(self) -> set[Path]:
        return {row.path for row in self.ledger.rows()}

    def close(self) -> None:
        self.stop.set()
        self.scanner.request(None)
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.watcher.stop()
        self.ledger.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def build(**options: Any) -> Harness:
        built = Harness(tmp_path, **options)
        made.append(built)
        return built

    yield build
    for built in made:
        built.close()


def write(path: Path, data: bytes = b"video") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def reader(watcher: Watcher) -> Any:
    """The inotify observer's reader of events, which the watcher's own observer class adds."""
    return getattr(watcher.observers[INOTIFY], "reader")  # noqa: B009 - the attribute is not in the base class


def overflow(watcher: Watcher) -> None:
    """What the kernel sends when its inotify queue overflows, delivered to the watcher's reader."""
    reader(watcher).handle_event(InotifyEvent(-1, InotifyConstants.IN_Q_OVERFLOW, 0, b""))  # type: ignore[arg-type]


def test_a_failing_handler_rescans_and_watching_goes_on(harness: Callable[..., Harness]) -> None:
    class FailsOnce(Recorder):
        failed = False

        def record(self, path: Path, info: os.stat_result | None = None, folder: Folder | None = None) -> bool:
            if not self.failed:
                self.failed = True
                raise RuntimeError("database is locked")
            return super().record(path, info, folder)

    run = harness(recorder_class=FailsOnce).start()
    first = write(run.folder / "first.mp4")
    run.wait_recorded(first)
    assert run.folder in run.requests
    second = write(run.folder / "second.mp4")
    run.wait_recorded(second)
    assert run.watcher.health() == []


@pytest.mark.parametrize("polling", [False, True])
def test_non_utf8_names_are_recorded_exactly(harness: Callable[..., Harness], polling: bool) -> None:
    run = harness(watch={"polling": polling})
    root = os.fsencode(run.folder)
    before = root + b"/before-\xff.mp4"
    Path(os.fsdecode(before)).write_bytes(b"video")
    run.start()
    inside = root + b"/dir-\xfe/clip-\xff\xfe.mp4"
    write(Path(os.fsdecode(inside)))
    for raw in (before, inside):
        run.wait_recorded(Path(os.fsdecode(raw)))
        row = run.ledger.get(Path(os.fsdecode(raw)))
        assert row is not None and os.fsencode(row.path) == raw


def test_a_queue_overflow_rescans_what_the_events_missed(harness: Callable[..., Harness]) -> None:
    class Deaf(Recorder):
        """Drops what events report while deaf is set, as an overflowing kernel queue does."""

        deaf = threading.Event()

        def record(self, path: Path, info: os.stat_result | None = None, folder: Folder | None = None) -> bool:
            if info is None and self.deaf.is_set():
                return False
            return super().record(path, info, folder)

    run = harness(recorder_class=Deaf).start()
    Deaf.deaf.set()
    lost = write(run.folder / "lost.mp4")
    heard = write(run.folder / "heard.mp4")
    threading.Event().wait(0.5)
    Deaf.deaf.clear()
    assert not run.recorded(lost) and not run.recorded(heard)
    with capture_logs() as logs:
        overflow(run.watcher)
    run.wait_recorded(lost, heard)
    assert run.folder in run.requests
    assert any("overflowed" in entry["event"] and "max_queued_events" in entry["fix"] for entry in logs)
    assert run.watcher.health() == []


@pytest.mark.parametrize(("mode", "dies"), [(INOTIFY, "observer"), (INOTIFY, "reader"), (POLLING, "poller")])
def test_a_dead_observer_is_restarted(harness: Callable[..., Harness], mode: str, dies: str) -> None:
    run = harness(watch={"polling": mode == POLLING}).start()
    dead = run.watcher.observers[mode]
    thread = reader(run.watcher) if dies == "reader" else dead
    thread.stop()
    thread.join(timeout=5)
    assert f"the {mode} observer is not running" in run.watcher.health()

    run.watcher.supervise()
    assert run.watcher.observers[mode] is not dead and run.watcher.observers[mode].is_alive()
    assert None in run.requests
    wait_until(lambda: run.watcher.health() == [], 10, "the folder to be watched again")
    after = write(run.folder / "after.mp4")
    run.wait_recorded(after)


@pytest.mark.parametrize("polling", [False, True])
def test_a_folder_deleted_and_recreated_is_watched_again(harness: Callable[..., Harness], polling: bool) -> None:
    run = harness(watch={"polling": polling}).start()
    shutil.rmtree(run.folder)

    def given_up() -> bool:
        run.watcher.supervise()
        return run.folder not in run.watcher.watches

    wait_until(given_up, 10, "the watch of the deleted folder to be given up")
    assert any(str(run.folder) in problem for problem in run.watcher.health())

    gap = write(run.folder / "gap.mp4")
    run.scanner.request(None)
    wait_until(lambda: run.watcher.health() == [], 10, "the recreated folder to be watched")
    run.wait_recorded(gap)
    assert run.watcher.watches[run.folder].mode == (POLLING if polling else INOTIFY)
    after = write(run.folder / "after.mp4")
    run.wait_recorded(after)


def test_a_folder_replaced_under_the_same_name_is_watched_as_the_new_directory(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    run = harness().start()
    run.folder.rename(tmp_path / "old")
    run.folder.mkdir()
    run.watcher.supervise()
    run.watcher.refresh()
    fresh = write(run.folder / "fresh.mp4")
    run.wait_recorded(fresh)
    assert run.watcher.watches[run.folder].identity == (run.folder.stat().st_dev, run.folder.stat().st_ino)


def test_a_remounted_folder_is_watched_again(harness: Callable[..., Harness]) -> None:
    run = harness().start()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(run.folder)], capture_output=True).returncode:
        pytest.skip("mounting is not permitted here")
    try:
        run.watcher.refresh()
        on_mount = write(run.folder / "on-mount.mp4")
        run.wait_recorded(on_mount)
    finally:
        subprocess.run(["umount", str(run.folder)], check=True)
    run.watcher.refresh()
    underneath = write(run.folder / "underneath.mp4")
    run.wait_recorded(underneath)
    assert run.watcher.health() == []


@pytest.mark.parametrize(
    ("refusal", "sysctl"),
    [(errno.ENOSPC, "fs.inotify.max_user_watches="), (errno.EMFILE, "fs.inotify.max_user_instances=")],
)
def test_inotify_limits_fall_back_to_polling(harness: Callable[..., Harness], refusal: int, sysctl: str) -> None:
    class LimitReached(Watcher):
        def add_watch(self, folder: Folder, mode: str, identity: tuple[int, int]) -> Watch:
            if mode == INOTIFY:
                raise OSError(refusal, os.strerror(refusal))
            return super().add_watch(folder, mode, identity)

    run = harness(watch={"polling": False}, watcher_class=LimitReached)
    with capture_logs() as logs:
        run.start()
    assert run.watcher.watches[run.folder].mode == POLLING
    loud = [entry for entry in logs if entry["event"].startswith("INOTIFY LIMIT REACHED")]
    assert loud and f"sysctl {sysctl}" in loud[0]["fix"] and loud[0]["log_level"] == "error"
    assert [problem for problem in run.watcher.health() if sysctl in problem]
    polled = write(run.folder / "polled.mp4")
    run.wait_recorded(polled)


def test_a_watch_refused_on_a_subdirectory_moves_the_folder_to_polling(harness: Callable[..., Harness]) -> None:
    run = harness().start()
    assert run.watcher.watches[run.folder].mode == INOTIFY
    refused = OSError(errno.ENOSPC, "inotify watch limit reached")
    reader(run.watcher).refused.put((os.fsencode(run.folder / "deep" / "sub"), refused))
    run.watcher.supervise()
    assert None in run.requests
    wait_until(lambda: run.folder in run.watcher.watches, 10, "the folder to be polled")
    assert run.watcher.watches[run.folder].mode == POLLING
    polled = write(run.folder / "deep" / "polled.mp4")
    run.wait_recorded(polled)


def test_the_watch_mode_follows_the_setting_and_the_filesystem() -> None:
    nas = Path("/mnt/nas/cams")
    mode, reason = watch_mode(nas, "auto", SAMPLE_MOUNTINFO)
    assert mode == POLLING and "nfs4" in reason
    assert watch_mode(Path("/media/cloud/x"), "auto", SAMPLE_MOUNTINFO)[0] == POLLING
    assert watch_mode(Path("/srv/videos"), "auto", SAMPLE_MOUNTINFO) == (INOTIFY, "it is on ext4, a local filesystem")
    assert watch_mode(Path("/srv/videos"), True, SAMPLE_MOUNTINFO)[0] == POLLING
    assert watch_mode(nas, False, SAMPLE_MOUNTINFO)[0] == INOTIFY
    assert watch_mode(nas, "auto", b"")[0] == INOTIFY


def test_a_local_folder_is_watched_by_inotify(tmp_path: Path) -> None:
    assert watch_mode(tmp_path.resolve(), "auto", read_mountinfo())[0] == INOTIFY


def test_a_folder_on_a_network_filesystem_is_polled(
    harness: Callable[..., Harness], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_bytes(
        b"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        + b"35 22 0:40 / "
        + os.fsencode(tmp_path.resolve())
        + b" rw - nfs4 nas:/export rw\n"
    )
    monkeypatch.setattr(mounts_module, "MOUNTINFO", mountinfo)
    run = harness()
    with capture_logs() as logs:
        run.start()
    assert run.watcher.watches[run.folder].mode == POLLING
    watching = [entry for entry in logs if entry["event"] == "watching"]
    assert watching[0]["mode"] == POLLING and "nfs4" in watching[0]["reason"]
    polled = write(run.folder / "polled.mp4")
    run.wait_recorded(polled)


@pytest.mark.parametrize("polling", [False, True])
def test_a_symlinked_directory_is_not_followed(harness: Callable[..., Harness], tmp_path: Path, polling: bool) -> None:
    outside = tmp_path / "outside"
    write(outside / "before.mp4")
    run = harness(watch={"polling": polling})
    (run.folder / "early").symlink_to(outside, target_is_directory=True)
    run.start()
    (run.folder / "late").symlink_to(outside, target_is_directory=True)
    write(outside / "during.mp4")
    write(run.folder / "late" / "through-the-link.mp4")
    control = write(run.folder / "real" / "control.mp4")
    run.wait_recorded(control)
    threading.Event().wait(2 * FAST_POLL)
    assert run.recorded_paths() == {control}

    folder = run.config.folders[0]
    assert [Path(path) for path, _ in walk(folder)] == [control]
    assert run.recorder.scan(folder, run.folder / "late") == 0
    assert run.recorded_paths() == {control}


def test_a_watch_left_on_a_directory_moved_out_does_not_report_through_a_symlink(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    run = harness().start()
    first = write(run.folder / "cam" / "first.mp4")
    run.wait_recorded(first)
    elsewhere = tmp_path / "elsewhere"
    (run.folder / "cam").rename(elsewhere)
    (run.folder / "cam").symlink_to(elsewhere, target_is_directory=True)
    write(elsewhere / "sneaky.mp4")
    control = write(run.folder / "control.mp4")
    run.wait_recorded(control)
    threading.Event().wait(1.0)
    assert not run.recorded(run.folder / "cam" / "sneaky.mp4")


def test_follow_symlinks_walks_each_linked_directory_once(tmp_path: Path) -> None:
    root = tmp_path / "watched"
    real = write(root / "real" / "a.mp4")
    outside = write(tmp_path / "outside" / "b.mp4")
    (root / "again").symlink_to(root / "real", target_is_directory=True)
    (root / "real" / "up").symlink_to(root, target_is_directory=True)
    (root / "out").symlink_to(outside.parent, target_is_directory=True)
    (root / "c.mp4").symlink_to(real)

    def names(follow: bool) -> list[str]:
        config = parse(
            {"watch": {"follow_symlinks": follow}, "folders": [{"path": str(root), "recursive": True}]},
            tmp_path / "c.yaml",
        )
        return sorted(Path(path).name for path, _ in walk(config.folders[0], follow_symlinks=follow))

    assert names(follow=False) == ["a.mp4"]
    assert names(follow=True) == ["a.mp4", "b.mp4"]


@pytest.mark.parametrize("polling", [False, True])
def test_directories_created_full_or_moved_in_whole_have_every_file_found(
    harness: Callable[..., Harness], tmp_path: Path, polling: bool
) -> None:
    staging = tmp_path / "staging"
    deep = [
        "day/a.mp4",
        "day/h00/b.mp4",
        "day/h00/m00/c.mp4",
        "day/h00/m00/s00/d.mp4",
        "day/h00/m00/s00/cam1/e.mp4",
        "day/h00/m00/s00/cam1/raw/f.mp4",
        "day/h23/g.mp4",
    ]
    for name in deep:
        write(staging / name)
    copied = ["copy/x.mp4", "copy/sub/y.mp4"]
    for name in copied:
        write(tmp_path / "source" / name)
    run = harness(watch={"polling": polling}).start()

    (staging / "day").rename(run.folder / "day")
    shutil.copytree(tmp_path / "source" / "copy", run.folder / "copy")
    burst = run.folder / "burst"
    burst.mkdir()
    written = [write(burst / f"{n}.mp4") for n in range(20)]

    run.wait_recorded(*(run.folder / name for name in deep + copied), *written)


def test_a_polled_folder_records_files_written_renamed_in_and_in_new_directories(
    harness: Callable[..., Harness],
) -> None:
    run = harness(watch={"polling": True}).start()
    written = write(run.folder / "written.mp4")
    write(run.folder / "renamed.mp4.part").rename(run.folder / "renamed.mp4")
    nested = write(run.folder / "new" / "deeper" / "nested.mp4")
    run.wait_recorded(written, run.folder / "renamed.mp4", nested)
    assert run.folder / "renamed.mp4.part" not in run.recorded_paths()


def test_a_file_appended_to_after_it_was_recorded_has_its_new_size_noticed(harness: Callable[..., Harness]) -> None:
    run = harness(watch={"polling": True, "settle_seconds": 600}).start()
    events = Events.create(stop=run.stop, abandon=threading.Event())
    settler = Settler(config=run.config, ledger=run.ledger, events=events, clock=run.ledger.clock)
    threading.Thread(target=settler.run, name="settler-under-test", daemon=True).start()
    growing = write(run.folder / "growing.mp4", b"first part")
    run.wait_recorded(growing)
    with open(growing, "ab") as file:
        file.write(b", and the rest")

    def size() -> int | None:
        row = run.ledger.get(growing)
        return None if row is None else row.size

    wait_until(lambda: size() == growing.stat().st_size, 10, "the appended size to reach the ledger")


def poller_over(run: Harness, directories: int) -> Poller:
    """A poller, not started, over a folder of directories with a recorded file each, their mtimes a minute old."""
    for number in range(directories):
        write(run.folder / f"d{number:03d}" / "old.mp4")
    run.recorder.scan(run.config.folders[0])
    for path in [run.folder, *run.folder.iterdir()]:
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 60 * 10**9))
    poller = Poller(run.recorder, run.request, FAST_POLL)
    poller.schedule(run.config.folders[0])
    return poller


def test_an_idle_pass_lists_no_directory_whose_mtime_did_not_change(harness: Callable[..., Harness]) -> None:
    run = harness(watch={"polling": True})
    poller = poller_over(run, 100)
    recorded = run.recorded_paths()
    assert [poller.poll() for _ in range(3)] == [0, 0, 0]

    arrived = write(run.folder / "d050" / "arrived.mp4")
    assert poller.poll() == 1
    assert run.recorded_paths() == recorded | {arrived}


def test_a_name_added_within_the_mtime_tick_of_a_listing_is_found_at_the_next_pass(
    harness: Callable[..., Harness],
) -> None:
    run = harness(watch={"polling": True})
    poller = poller_over(run, 1)
    directory = run.folder / "d000"
    first = write(directory / "first.mp4")
    # An mtime no listing can prove a whole tick old, however slow this machine: as if the server's clock ran ahead.
    tick = time.time_ns() + 3600 * 10**9
    os.utime(directory, ns=(directory.stat().st_atime_ns, tick))
    assert poller.poll() == 1
    assert first in run.recorded_paths()
    late = write(directory / "late.mp4")
    # What a filesystem that keeps mtimes to the second does when both names arrive within one second.
    os.utime(directory, ns=(directory.stat().st_atime_ns, tick))
    poller.poll()
    assert late in run.recorded_paths()


def test_a_directory_renamed_or_deleted_is_forgotten_and_found_again_where_it_is(
    harness: Callable[..., Harness],
) -> None:
    run = harness(watch={"polling": True})
    poller = poller_over(run, 3)
    polled = poller.folders[run.folder]
    known = set(polled.directories)

    (run.folder / "d001").rename(run.folder / "d001-renamed")
    shutil.rmtree(run.folder / "d002")
    poller.poll()
    assert run.folder / "d001-renamed" / "old.mp4" in run.recorded_paths()
    assert set(polled.directories) == known - {str(run.folder / "d001"), str(run.folder / "d002")} | {
        str(run.folder / "d001-renamed")
    }

    back = write(run.folder / "d002" / "sub" / "back.mp4")
    poller.poll()
    assert back in run.recorded_paths()


def test_a_subdirectory_deleted_and_recreated_with_files_is_polled_again(harness: Callable[..., Harness]) -> None:
    run = harness(watch={"polling": True}).start()
    first = write(run.folder / "cam" / "first.mp4")
    run.wait_recorded(first)
    shutil.rmtree(run.folder / "cam")
    again = [write(run.folder / "cam" / "again.mp4"), write(run.folder / "cam" / "day" / "deeper.mp4")]
    run.wait_recorded(*again)
    later = write(run.folder / "cam" / "day" / "later.mp4")
    run.wait_recorded(later)
    assert run.watcher.health() == []
