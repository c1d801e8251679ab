"""The promises under failure, proven with real processes: kill -9, power loss, full disks, changing files.

At-least-once delivery with duplicates only in one named window (the server accepted, the answer was lost),
which the daemon closes with list_videos; no file lost; nothing outside the watched folders read.
"""

from __future__ import annotations

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
import yaml

from memories_ingest.ledger import UPLOADED, UPLOADING, Ledger
from memories_ingest.samples import write_video
from memories_ingest.sandbox import Sandbox

from conftest import API_KEY, spawned, wait_until

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
    return spawned(
        subprocess.Popen(  # type: ignore[call-overload]
            [*COMMAND, "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen
        )
    )


def states(tmp_path: Path) -> dict[str, str]:
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        return {row.path.name: row.state for row in ledger.rows()}
    finally:
        ledger.close()


def kill(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.communicate(timeout=10)


def finish(config: Path, tmp_path: Path, names: list[str]) -> None:
    """Run the daemon until every file is uploaded, then stop it warmly."""
    daemon = start(config)
    try:
        wait_until(lambda: all(states(tmp_path).get(n) == UPLOADED for n in names), 60, "every file uploaded")
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
