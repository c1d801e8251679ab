"""The running daemon as an operator meets it: warm and cold shutdown, pauses a person can lift, reloads."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import yaml

from memories_ingest.samples import faststart_padding, write_video
from memories_ingest.sandbox import Sandbox
from memories_ingest.states import QUEUED, UPLOADED, UPLOADING

from conftest import API_KEY, COMMAND, daemon_config, pause_of, row_of, run_cli, signal_pending, spawned, wait_until


def start(config: Path, key: str = API_KEY) -> subprocess.Popen[str]:
    return spawned(
        subprocess.Popen(
            [*COMMAND, "run", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "MEMORIES_API_KEY": key},
        )
    )


def big_video(tmp_path: Path, megabytes: int) -> Path:
    video = write_video(tmp_path / "staging.mp4", seconds=1, faststart=True)
    faststart_padding(video, megabytes << 20)
    return video.rename(tmp_path / "watched" / "big.mp4")


def midway(tmp_path: Path, video: Path, sandbox: Sandbox) -> None:
    """Wait until the upload is under way, its body partly read by the server and not yet whole."""
    wait_until(
        lambda: (row := row_of(tmp_path, video)) is not None and row.state == UPLOADING and (row.bytes_sent or 0) > 0,
        60,
        "the upload to be under way",
    )
    assert sandbox.received() == [], "the body must still be on its way"


def test_a_first_sigterm_lets_the_upload_in_flight_finish_and_exits_0(tmp_path: Path, sandbox: Sandbox) -> None:
    config = daemon_config(tmp_path, sandbox, upload={"shutdown_grace_seconds": 60})
    video = big_video(tmp_path, 24)
    # The server reads the body at 3 MiB/s: some eight seconds for the whole file.
    sandbox.inject("trickle", bytes_per_second=3 << 20)
    daemon = start(config)
    midway(tmp_path, video, sandbox)
    daemon.send_signal(signal.SIGTERM)
    _, stderr = daemon.communicate(timeout=90)
    assert daemon.returncode == 0, stderr
    (received,) = sandbox.received()
    assert received.size == video.stat().st_size
    assert received.sha256 == hashlib.sha256(video.read_bytes()).hexdigest()
    row = row_of(tmp_path, video)
    assert row is not None and row.state == UPLOADED and row.video_no == received.video_no


def test_a_second_sigterm_abandons_the_upload_at_once_and_it_goes_first_next_time(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    config = daemon_config(tmp_path, sandbox, upload={"shutdown_grace_seconds": 600})
    video = big_video(tmp_path, 24)
    sandbox.inject("trickle", bytes_per_second=1 << 20)
    daemon = start(config)
    midway(tmp_path, video, sandbox)
    daemon.send_signal(signal.SIGTERM)
    # Two signals pending at once are one: send the second only once the first has been taken.
    wait_until(lambda: not signal_pending(daemon.pid, signal.SIGTERM), what="the first SIGTERM to be delivered")
    daemon.send_signal(signal.SIGTERM)
    _, stderr = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, stderr
    row = row_of(tmp_path, video)
    assert row is not None and row.state == QUEUED and row.error == "upload abandoned at shutdown"
    wait_until(lambda: sandbox.requests() and sandbox.requests()[0].http_status == 0, 30, "the server to see it go")
    assert sandbox.received() == []


def test_a_restart_with_another_key_lifts_the_pause_the_old_key_caused(tmp_path: Path, sandbox: Sandbox) -> None:
    config = daemon_config(tmp_path, sandbox, upload={"account_check_seconds": 3600})
    video = write_video(tmp_path / "watched" / "a.mp4")
    sandbox.set_account("bad_key")
    daemon = start(config, key="sk-the-wrong-one")
    wait_until(lambda: (p := pause_of(tmp_path)) is not None and p.cause == "key", 30, "the key pause")
    status = run_cli(config, "status").stdout
    assert "the API key was refused" in status and "memories-ingest resume" in status
    daemon.send_signal(signal.SIGTERM)
    daemon.communicate(timeout=30)
    sandbox.set_account("ok")
    daemon = start(config, key=API_KEY)
    try:
        wait_until(lambda: (row := row_of(tmp_path, video)) is not None and row.state == UPLOADED, 30, "the upload")
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
    assert "a different API key: the pause its predecessor caused is lifted" in stderr
    assert pause_of(tmp_path) is None


def test_resume_lifts_an_account_pause_now_and_the_next_upload_is_the_trial(tmp_path: Path, sandbox: Sandbox) -> None:
    config = daemon_config(tmp_path, sandbox, upload={"account_check_seconds": 3600})
    video = write_video(tmp_path / "watched" / "a.mp4")
    sandbox.set_account("insufficient_balance")
    daemon = start(config)
    try:
        wait_until(lambda: (p := pause_of(tmp_path)) is not None and p.cause == "balance", 30, "the balance pause")
        sandbox.set_account("ok")
        resumed = run_cli(config, "resume")
        assert resumed.returncode == 0
        assert "lifted: the account has no points left" in resumed.stdout
        assert "the next upload goes out now, as the trial" in resumed.stdout
        wait_until(lambda: (row := row_of(tmp_path, video)) is not None and row.state == UPLOADED, 30, "the trial")
        wait_until(lambda: pause_of(tmp_path) is None, 30, "the pause to clear")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)
    assert [record.code for record in sandbox.requests()] == ["0402", "0000"]
    assert run_cli(config, "resume").stdout.strip() == "uploads are not paused"


def test_a_rejected_reload_is_recorded_and_the_tools_still_work(tmp_path: Path, sandbox: Sandbox) -> None:
    config = daemon_config(tmp_path, sandbox)
    good = config.read_text()
    video = write_video(tmp_path / "watched" / "a.mp4")
    daemon = start(config)
    lines: list[dict[str, Any]] = []
    reader = threading.Thread(
        target=lambda: lines.extend(json.loads(line) for line in daemon.stderr or () if line.startswith("{")),
        daemon=True,
    )
    reader.start()
    try:
        wait_until(lambda: (row := row_of(tmp_path, video)) is not None and row.state == UPLOADED, 30, "the upload")
        document = yaml.safe_load(good)
        document["folders"][0]["latitude"] = "north"
        document["colour"] = "blue"
        config.write_text(yaml.safe_dump(document))
        daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: "REJECTED" in run_cli(config, "status").stdout, 30, "status to say the reload was rejected")
        status = run_cli(config, "status").stdout
        assert "folders[0].latitude: 'north' is not a decimal number" in status
        assert "colour: unknown key" in status
        for command in (["list"], ["retry", str(video)], ["resume"], ["status", "--json"]):
            assert run_cli(config, *command).returncode == 0, command
        config.write_text(good)
        daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: "REJECTED" not in run_cli(config, "status").stdout, 30, "the good config to be taken")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)
    assert any("the new config is invalid" in line["event"] for line in lines)
