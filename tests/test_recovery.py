"""The promises under failure, proven with real processes: kill -9, power loss, full disks, changing files.

At-least-once delivery with duplicates only in one named window (the server accepted, the answer was lost),
which the daemon closes with list_videos; no file lost; nothing outside the watched folders read.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import requests
import yaml
from requests_toolbelt import MultipartEncoder

from memories_ingest.ledger import Ledger
from memories_ingest.samples import faststart_padding, write_video
from memories_ingest.sandbox import UPLOAD_PATH, Sandbox
from memories_ingest.states import UPLOADED, UPLOADING

from conftest import API_KEY, pause_of, read_ledger, spawned, wait_until

COMMAND = [sys.executable, "-m", "memories_ingest.cli", "run"]


def write_config(tmp_path: Path, sandbox: Sandbox, **watch: object) -> Path:
    (tmp_path / "watched").mkdir(exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": sandbox.url, "read_timeout_seconds": 2},
                "ledger": "ledger.db",
                "watch": {"settle_seconds": 0.2, **watch},
                "upload": {"rate_per_second": 20, "workers": 2},
                "folders": [{"path": "watched", "unique_id": "crash"}],
            }
        )
    )
    return path


def start(config: Path, **popen: object) -> subprocess.Popen[str]:
    env = {**os.environ, "MEMORIES_API_KEY": API_KEY}
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return spawned(
        subprocess.Popen(  # type: ignore[call-overload]
            [*COMMAND, "-c", str(config)], text=True, env=env, **options
        )
    )


def states(tmp_path: Path) -> dict[str, str]:
    """The ledger's rows by file name, read as `status` reads them: never making a ledger that is not there."""
    with read_ledger(tmp_path) as ledger:
        return {} if ledger is None else {row.path.name: row.state for row in ledger.rows()}


def pause_kind(tmp_path: Path) -> str | None:
    pause = pause_of(tmp_path)
    return pause.kind if pause else None


def kill(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.communicate(timeout=10)


def finish(config: Path, tmp_path: Path, names: list[str]) -> None:
    """Run the daemon until every file is uploaded, then stop it warmly."""
    daemon = start(config)
    try:
        wait_until(lambda: all(states(tmp_path).get(n) == UPLOADED for n in names), 90, "every file uploaded")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)


def test_kill_9_at_random_moments_loses_nothing_and_sends_nothing_twice(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path, sandbox)
    names = [f"clip{n}.mp4" for n in range(12)]
    rng = random.Random(7)
    pause = threading.Event()
    for round_number in range(6):
        for name in names[round_number * 2 : round_number * 2 + 2]:
            write_video(tmp_path / "watched" / name, seconds=1 + names.index(name) / 10)
        daemon = start(config)
        pause.wait(rng.uniform(0.4, 1.5))
        kill(daemon)
    finish(config, tmp_path, names)
    counts = Counter(video.filename for video in sandbox.received())
    assert set(counts) == set(names)
    assert max(counts.values()) == 1, counts


def test_a_file_recorded_but_not_yet_validated_survives_a_kill(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path, sandbox, settle_seconds=30)
    daemon = start(config)
    video = write_video(tmp_path / "watched" / "a.mp4")
    wait_until(lambda: states(tmp_path).get("a.mp4") == "pending", what="the row")
    kill(daemon)
    write_config(tmp_path, sandbox)
    finish(config, tmp_path, [video.name])
    assert [v.filename for v in sandbox.received()] == ["a.mp4"]


def test_an_upload_the_server_took_but_never_answered_is_not_sent_again(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path, sandbox)
    sandbox.inject("slow", seconds=30, accept=True)
    write_video(tmp_path / "watched" / "a.mp4")
    daemon = start(config)
    wait_until(lambda: len(sandbox.received()) == 1, what="the server to take the upload")
    assert states(tmp_path)["a.mp4"] == UPLOADING
    kill(daemon)
    finish(config, tmp_path, ["a.mp4"])
    assert len(sandbox.received()) == 1
    ledger = Ledger(tmp_path / "ledger.db")
    row = ledger.rows()[0]
    assert row.video_no == sandbox.received()[0].video_no
    assert row.error is not None and "recovered from list_videos" in row.error


@pytest.mark.parametrize("landed", [True, False], ids=["landed-so-reconciled", "lost-so-sent-again"])
def test_an_answer_lost_while_running_ends_in_exactly_one_upload(
    tmp_path: Path, sandbox: Sandbox, landed: bool
) -> None:
    config = write_config(tmp_path, sandbox)
    sandbox.inject("slow", seconds=5, accept=landed)
    write_video(tmp_path / "watched" / "a.mp4")
    finish(config, tmp_path, ["a.mp4"])
    assert len(sandbox.received()) == 1


def same_size_videos(folder: Path, names: list[str], size: int = 32 * 1024) -> list[Path]:
    """Real, different videos that are all exactly the same size, as a camera that writes fixed-length clips makes."""
    made = []
    for number, name in enumerate(names):
        staged = write_video(folder.parent / f"staging-{name}", seconds=1 + number / 10, faststart=True)
        faststart_padding(staged, size)
        made.append(staged.rename(folder / name))
    return made


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def delivered_correctly(tmp_path: Path, sandbox: Sandbox, files: list[Path]) -> tuple[list[str], list[str], int]:
    """Files lost, files given another file's video, and the duplicates the server holds."""
    by_number = {video.video_no: video.sha256 for video in sandbox.received()}
    ledger = Ledger(tmp_path / "ledger.db")
    rows = {row.path: row for row in ledger.rows()}
    ledger.close()
    lost = [f.name for f in files if f not in rows or rows[f].state != UPLOADED or not rows[f].video_no]
    wrong = [f.name for f in files if f.name not in lost and by_number.get(rows[f].video_no or "") != sha256(f)]
    copies = Counter(video.sha256 for video in sandbox.received())
    return lost, wrong, sum(count - 1 for count in copies.values())


def test_same_size_files_with_one_body_lost_and_one_answer_lost_each_get_their_own_video(tmp_path: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=20, parse_seconds=0.2) as sandbox:
        config = write_config(tmp_path, sandbox)
        files = same_size_videos(tmp_path / "watched", ["a.mp4", "b.mp4"])
        # One body is stored and its answer never comes; the other is dropped behind a gateway timeout.
        sandbox.inject("slow", seconds=8, accept=True)
        sandbox.inject("slow", seconds=8, accept=False)
        finish(config, tmp_path, [f.name for f in files])
        lost, wrong, duplicates = delivered_correctly(tmp_path, sandbox, files)
        assert len(sandbox.received()) == 2
    assert (lost, wrong, duplicates) == ([], [], 0)


def test_same_size_files_stay_uncertain_until_their_tags_tell_them_apart(tmp_path: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=20, parse_seconds=3600) as never_parses:
        config = write_config(tmp_path, never_parses)
        same_size_videos(tmp_path / "watched", ["a.mp4", "b.mp4"])
        never_parses.inject("slow", seconds=8, accept=True)
        never_parses.inject("slow", seconds=8, accept=False)
        daemon = start(config)
        try:
            wait_until(lambda: len(doubts(tmp_path)) == 2, 90, "both files to be in doubt after asking list_videos")
            # Each doubt is asked about again every few seconds, and is `uploading` while it is: wait for a moment
            # when neither is.
            status = wait_until(
                lambda: next((shown for shown in [status_of(config)] if "uncertain: 2" in shown), None),
                60,
                "status to show both files uncertain",
            )
        finally:
            kill(daemon)
        assert len(never_parses.received()) == 1, "nothing is sent again while it may have landed"
    assert "uncertain: 2" in status
    assert "video(s) of its size are not parsed yet, and only their tags can tell" in status


def status_of(config: Path) -> str:
    command = [*COMMAND[:-1], "status", "-c", str(config)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def doubts(tmp_path: Path) -> list[str]:
    with read_ledger(tmp_path) as ledger:
        errors = [row.error or "" for row in ledger.rows() if row.state == "uncertain"] if ledger else []
    return [error for error in errors if "not parsed yet" in error]


def test_kill_9_over_same_size_files_loses_none_and_never_gives_a_file_another_files_video(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    config = write_config(tmp_path, sandbox)
    names = [f"clip{n:02}.mp4" for n in range(30)]
    files = same_size_videos(tmp_path / "watched", names)
    rng = random.Random(11)
    pause = threading.Event()
    kills = 0
    for _ in range(12):
        # Some answers stall, so that kills also land between the server storing a body and the ledger hearing of it.
        sandbox.inject("slow", times=2, seconds=rng.uniform(0.2, 1.5), accept=True)
        daemon = start(config)
        pause.wait(rng.uniform(0.5, 2.0))
        kill(daemon)
        kills += 1
        sandbox.clear_faults()
    finish(config, tmp_path, names)
    lost, wrong, duplicates = delivered_correctly(tmp_path, sandbox, files)
    recovered = sum("identity tag" in (row.error or "") for row in Ledger(tmp_path / "ledger.db").rows())
    print(
        f"same-size crash loop: {len(files)} files, {kills} kills, {len(lost)} lost, {len(wrong)} wrong, "
        f"{duplicates} duplicates, {recovered} recovered by their identity tag"
    )
    assert (lost, wrong, duplicates) == ([], [], 0)


def test_a_power_loss_copy_of_the_ledger_is_intact_and_keeps_every_acknowledged_upload(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    config = write_config(tmp_path, sandbox)
    for n in range(10):
        write_video(tmp_path / "watched" / f"v{n}.mp4", seconds=1 + n / 10)
    daemon = start(config)
    acknowledged: list[str] = []

    def read_log() -> None:
        assert daemon.stderr is not None
        for line in daemon.stderr:
            if line.startswith("{") and json.loads(line).get("event") == "uploaded":
                acknowledged.append(Path(json.loads(line)["path"]).name)

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    wait_until(lambda: len(acknowledged) >= 4, what="some uploads")
    daemon.send_signal(signal.SIGSTOP)
    snapshot = list(acknowledged)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-wal", "-shm"):
        source = tmp_path / f"ledger.db{suffix}"
        if source.exists():
            shutil.copy(source, crashed / source.name)
    daemon.kill()
    daemon.wait(timeout=10)
    conn = sqlite3.connect(crashed / "ledger.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    recovered = Ledger(crashed / "ledger.db")
    uploaded = {row.path.name for row in recovered.rows(UPLOADED)}
    assert set(snapshot) <= uploaded


def test_a_full_disk_stops_the_daemon_with_one_clear_error(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path, sandbox)
    for n in range(30):
        write_video(tmp_path / "watched" / f"v{n}.mp4", seconds=1 + n / 10)

    Ledger(tmp_path / "ledger.db").close()
    room = (tmp_path / "ledger.db").stat().st_size + 48 * 1024

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, room))

    daemon = start(config, preexec_fn=small_disk)
    _, stderr = daemon.communicate(timeout=60)
    assert daemon.returncode == 74, stderr
    errors = [json.loads(line) for line in stderr.splitlines() if line.startswith("{") and '"error"' in line]
    stops = [e for e in errors if e["event"].startswith("stopping: the ledger cannot be written")]
    assert len(stops) == 1 and "is the disk full" in stops[0]["error"]
    assert "Traceback" not in stderr
    conn = sqlite3.connect(tmp_path / "ledger.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("ledger", ["/proc/memories-ingest/ledger.db", "/proc/ledger.db", "a-file/ledger.db"])
def test_a_ledger_that_cannot_be_made_there_is_a_config_error_named_once(
    tmp_path: Path, sandbox: Sandbox, ledger: str
) -> None:
    config = write_config(tmp_path, sandbox)
    (tmp_path / "a-file").write_text("not a directory")
    document = yaml.safe_load(config.read_text())
    document["ledger"] = ledger
    config.write_text(yaml.safe_dump(document))
    daemon = start(config)
    _, stderr = daemon.communicate(timeout=30)
    assert daemon.returncode == 78
    (line,) = [line for line in stderr.strip().splitlines() if "ledger" in line]
    assert "ledger: " in line and "Traceback" not in stderr


def test_a_ledger_that_is_not_a_database_is_one_clear_error(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path, sandbox)
    (tmp_path / "ledger.db").write_bytes(b"this is not SQLite" * 100)
    daemon = start(config)
    _, stderr = daemon.communicate(timeout=30)
    assert daemon.returncode == 69
    (line,) = stderr.strip().splitlines()
    assert "ledger" in line and "Traceback" not in stderr


def test_a_missing_ledger_directory_is_made(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path, sandbox)
    document = yaml.safe_load(config.read_text())
    document["ledger"] = "state/deeper/ledger.db"
    config.write_text(yaml.safe_dump(document))
    write_video(tmp_path / "watched" / "a.mp4")
    daemon = start(config)
    try:
        wait_until(lambda: len(sandbox.received()) == 1, 30, "the upload")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)
    assert (tmp_path / "state" / "deeper").stat().st_mode & 0o777 == 0o700


def run_command(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEMORIES_API_KEY": API_KEY}
    return subprocess.run(
        [*COMMAND[:-1], *args, "-c", str(config)], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize("fate", ["deleted", "replaced"])
def test_a_ledger_deleted_or_replaced_under_the_daemon_stops_it_loudly(
    tmp_path: Path, sandbox: Sandbox, fate: str
) -> None:
    config = write_config(tmp_path, sandbox)
    video = write_video(tmp_path / "watched" / "a.mp4")
    daemon = start(config)
    wait_until(lambda: states(tmp_path).get(video.name) == UPLOADED, 30, "the first upload")
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"ledger.db{suffix}").unlink(missing_ok=True)
    if fate == "replaced":
        Ledger(tmp_path / "ledger.db").close()
    _, stderr = daemon.communicate(timeout=30)
    assert daemon.returncode == 74
    assert "LEDGER GONE" in stderr and fate in stderr
    assert len(sandbox.received()) == 1


def test_a_new_ledger_where_an_earlier_one_was_sends_nothing_until_rebuilt(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path, sandbox)
    names = ["a.mp4", "b.mp4"]
    for number, name in enumerate(names):
        write_video(tmp_path / "watched" / name, seconds=1 + number / 10)
    finish(config, tmp_path, names)
    wait_until(lambda: all(sandbox.video_status(v.video_no) == "PARSE" for v in sandbox.received()), what="parsing")
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"ledger.db{suffix}").unlink(missing_ok=True)

    daemon = start(config)
    try:
        wait_until(lambda: pause_kind(tmp_path) == "ledger", 30, "the pause for a new ledger")
        status = run_command(config, "status").stdout
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
    assert "THIS IS NOT THE LEDGER THAT WAS HERE BEFORE" in stderr
    assert "kept 2 uploads here" in status and "memories-ingest rebuild" in status
    assert len(sandbox.received()) == 2, "nothing is sent twice"

    dry = run_command(config, "rebuild", "--dry-run")
    assert "2 file(s) would be recorded as already on memories.ai (2 by their identity tag" in dry.stdout
    rebuilt = run_command(config, "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "2 file(s) recorded as already on memories.ai" in rebuilt.stdout
    assert "the pause for a new ledger is lifted" in rebuilt.stdout
    later = write_video(tmp_path / "watched" / "c.mp4", seconds=2)
    finish(config, tmp_path, [*names, later.name])
    assert sorted(video.filename for video in sandbox.received()) == ["a.mp4", "b.mp4", "c.mp4"]


def test_an_orphaned_journal_beside_a_missing_ledger_is_a_trace_too(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path, sandbox)
    write_video(tmp_path / "watched" / "a.mp4")
    Ledger(tmp_path / "ledger.db").close()
    (tmp_path / "ledger.db-wal").write_bytes(b"what an earlier ledger left")
    (tmp_path / "ledger.db").unlink()
    daemon = start(config)
    try:
        wait_until(lambda: pause_kind(tmp_path) == "ledger", 30, "the pause for a new ledger")
        resumed = run_command(config, "resume")
        assert resumed.returncode == 0 and "lifted: this ledger is new, and an earlier" in resumed.stdout
        wait_until(lambda: len(sandbox.received()) == 1, 30, "the upload once a person resumed")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)
    assert list(tmp_path.glob("ledger.db-wal.orphaned-*")), "the orphan is set aside, not replayed"


def test_a_server_that_names_videos_after_files_proves_a_landing_by_its_one_name(tmp_path: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=20, parse_seconds=3600, video_names="stem") as sandbox:
        config = write_config(tmp_path, sandbox)
        (video,) = same_size_videos(tmp_path / "watched", ["clip.mp4"])
        sandbox.inject("slow", seconds=8, accept=True)
        finish(config, tmp_path, [video.name])
        (received,) = sandbox.received()
    with read_ledger(tmp_path) as ledger:
        assert ledger is not None
        row = ledger.get(video)
    assert row is not None and row.video_no == received.video_no
    assert row.error and "the only video of its name and size since the send" in row.error


def test_files_of_one_name_and_size_never_take_each_others_video_by_name(tmp_path: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=20, parse_seconds=3600, video_names="stem") as sandbox:
        config = write_config(tmp_path, sandbox)
        document = yaml.safe_load(config.read_text())
        document["folders"][0]["recursive"] = True
        config.write_text(yaml.safe_dump(document))
        for day in ("day1", "day2"):
            (tmp_path / "watched" / day).mkdir()
        first = same_size_videos(tmp_path / "watched" / "day1", ["clip.mp4"])
        second = same_size_videos(tmp_path / "watched" / "day2", ["clip.mp4"])
        # One body lands with its answer lost; the other is dropped behind a gateway timeout.
        sandbox.inject("slow", seconds=8, accept=True)
        sandbox.inject("slow", seconds=8, accept=False)
        daemon = start(config)
        try:
            wait_until(lambda: len(doubts(tmp_path)) == 2, 90, "both to stay in doubt")
        finally:
            kill(daemon)
        assert len(sandbox.received()) == 1
    with read_ledger(tmp_path) as ledger:
        assert ledger is not None
        assert [ledger.get(path) for path in (*first, *second)] and not ledger.delivered_video_numbers()


def test_neither_an_upload_on_a_new_ledger_nor_a_restored_backup_slips_past_the_check(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    config = write_config(tmp_path, sandbox)
    names = ["a.mp4", "b.mp4"]
    write_video(tmp_path / "watched" / names[0])
    finish(config, tmp_path, names[:1])
    backup = tmp_path / "backup.db"
    with read_ledger(tmp_path) as ledger:
        assert ledger is not None
        ledger._conn.execute(f"VACUUM INTO '{backup}'")
    write_video(tmp_path / "watched" / names[1], seconds=2)
    finish(config, tmp_path, names)

    # The ledger goes; an `upload` by hand makes a new one with one upload of its own.
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"ledger.db{suffix}").unlink(missing_ok=True)
    by_hand = write_video(tmp_path / "by-hand.mp4", seconds=3)
    uploaded = run_command(config, "upload", str(by_hand))
    assert uploaded.returncode == 75 and "this is not the ledger that kept 2 uploads here" in uploaded.stderr
    assert pause_kind(tmp_path) == "ledger"

    # An older copy of the right ledger comes back from a backup.
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"ledger.db{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, tmp_path / "ledger.db")
    daemon = start(config)
    try:
        wait_until(lambda: pause_kind(tmp_path) == "ledger", 30, "the pause for an older copy")
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
    assert "this ledger records 1 uploads, but it had 2 when last seen" in stderr
    assert len(sandbox.received()) == 2, "nothing was sent twice"


def test_rebuild_never_gives_one_unparsed_video_to_two_files_of_a_scope(tmp_path: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=20, parse_seconds=3600, video_names="stem") as sandbox:
        config = write_config(tmp_path, sandbox)
        document = yaml.safe_load(config.read_text())
        document["folders"] = [{"path": "cam-a", "unique_id": "home"}, {"path": "cam-b", "unique_id": "home"}]
        config.write_text(yaml.safe_dump(document))
        for camera in ("cam-a", "cam-b"):
            (tmp_path / camera).mkdir()
        (first,) = same_size_videos(tmp_path / "cam-a", ["clip.mp4"])
        same_size_videos(tmp_path / "cam-b", ["clip.mp4"])
        # memories.ai holds one unparsed video named `clip`, of their size: it cannot tell which file it is.
        fields = [("unique_id", "home")]
        encoder = MultipartEncoder(fields=[*fields, ("file", ("clip.mp4", first.read_bytes(), "video/mp4"))])
        requests.post(
            sandbox.url + UPLOAD_PATH,
            data=encoder,
            headers={"Content-Type": encoder.content_type, "Authorization": API_KEY},
            timeout=10,
        )
        rebuilt = run_command(config, "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "0 file(s) recorded as already on memories.ai" in rebuilt.stdout
    assert "2 not found there" in rebuilt.stdout
