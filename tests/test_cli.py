"""The command line, run as real subprocesses: run, status, list, retry, probe and demo."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from memories_ingest.files import Version
from memories_ingest.ledger import Ledger, Pause
from memories_ingest.pacing import Pacer
from memories_ingest.samples import faststart_padding, write_video
from memories_ingest.sandbox import Sandbox
from memories_ingest.states import FAILED, UPLOADED

from conftest import API_KEY, COMMAND, daemon_config, row_of, spawned, wait_until


@pytest.fixture
def config_file(tmp_path: Path, sandbox: Sandbox) -> Path:
    return daemon_config(
        tmp_path,
        sandbox,
        watch={"settle_seconds": 0.3},
        folders=[{"path": "watched", "unique_id": "cli", "tags": ["cli"]}],
    )


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "MEMORIES_API_KEY": API_KEY, **extra}


def cli(*args: str, config: Path | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    options = ["-c", str(config)] if config else []
    return subprocess.run(
        [*COMMAND, *args, *options], capture_output=True, text=True, env=environment(), timeout=120, **kwargs
    )


def start_daemon(config: Path, *extra: str) -> subprocess.Popen[str]:
    return spawned(
        subprocess.Popen(
            [*COMMAND, "run", "-c", str(config), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(),
        )
    )


def uploaded(ledger_path: Path, path: Path) -> bool:
    ledger = Ledger(ledger_path)
    try:
        row = ledger.get(path)
        return row is not None and row.state == UPLOADED
    finally:
        ledger.close()


def test_run_status_list_and_no_second_upload_after_a_restart(
    config_file: Path, tmp_path: Path, sandbox: Sandbox
) -> None:
    video = write_video(tmp_path / "watched" / "a.mp4")
    daemon = start_daemon(config_file)
    try:
        wait_until(lambda: uploaded(tmp_path / "ledger.db", video), what="the upload")
        status = cli("status", "--json", config=config_file)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["counts"][UPLOADED] == 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, stderr
    assert API_KEY not in stderr
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "uploaded" in events and "stopped" in events

    again = start_daemon(config_file)
    try:
        threading.Event().wait(2.0)
    finally:
        again.send_signal(signal.SIGTERM)
        again.communicate(timeout=30)
    assert len(sandbox.received()) == 1

    listing = cli("list", "--json", config=config_file)
    (row,) = json.loads(listing.stdout)
    assert row["path"] == str(video) and row["state"] == UPLOADED and row["video_no"].startswith("VI")
    assert {"unique_id", "attempts", "error"} <= row.keys()


def test_run_once_exits_zero_after_uploading(config_file: Path, tmp_path: Path, sandbox: Sandbox) -> None:
    write_video(tmp_path / "watched" / "a.mkv", codec="vp9")
    result = cli("run", "--once", config=config_file)
    assert result.returncode == 0, result.stderr
    assert [v.filename for v in sandbox.received()] == ["a.mkv"]


def test_run_refuses_a_bad_config_before_doing_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("folders:\n  - path: x\n    latitude: abc\nwatch:\n  settle: 3\n")
    result = cli("run", config=bad)
    assert result.returncode == 78
    assert f"{bad}: folders[0].latitude: 'abc' is not a decimal number" in result.stderr
    assert f"{bad}: watch.settle: unknown key" in result.stderr
    assert not (tmp_path / "ledger.db").exists()


def test_run_without_a_key_says_where_to_put_it(config_file: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MEMORIES_API_KEY"}
    result = subprocess.run([*COMMAND, "run", "-c", str(config_file)], capture_output=True, text=True, env=env)
    assert result.returncode == 78
    assert "MEMORIES_API_KEY" in result.stderr


def test_retry_puts_failed_files_back(config_file: Path, tmp_path: Path, sandbox: Sandbox) -> None:
    sandbox.inject("invalid_field", msg="callback is not a valid URL")
    video = write_video(tmp_path / "watched" / "a.mp4")
    assert cli("run", "--once", config=config_file).returncode == 0
    failed = json.loads(cli("list", "--state", FAILED, "--json", config=config_file).stdout)
    assert [r["path"] for r in failed] == [str(video)]
    assert "callback is not a valid URL" in failed[0]["error"]
    result = cli("retry", "--all-failed", config=config_file)
    assert result.returncode == 0 and "1 failed file(s) back in the queue" in result.stdout
    by_path = cli("retry", str(video), str(tmp_path / "watched" / "never.mp4"), config=config_file).stdout
    assert f"{video}: on its way already (pending)" in by_path
    assert "never.mp4: not in the ledger" in by_path
    assert cli("run", "--once", config=config_file).returncode == 0
    assert uploaded(tmp_path / "ledger.db", video)


def test_probe_explains_a_file(tmp_path: Path) -> None:
    good = write_video(tmp_path / "good.mp4", metadata={"creation_time": "2024-01-02T03:04:05Z"})
    result = cli("probe", str(good))
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report["accepted"] and report["video_codec"] == "h264"
    bad = write_video(tmp_path / "bad.mp4", codec="mpeg4")
    rejected = cli("probe", str(bad))
    assert rejected.returncode == 1
    assert json.loads(rejected.stdout)["reason"] == "video codec mpeg4 is not one of h264, hevc, vp9"


def test_the_demo_uploads_a_sample_video_to_the_sandbox() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MEMORIES_API_KEY"}
    result = subprocess.run([*COMMAND, "demo"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"state": "uploaded"' in result.stdout
    assert "the sandbox received" in result.stdout


def test_upload_sends_files_once_outside_the_daemon(config_file: Path, tmp_path: Path, sandbox: Sandbox) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    video = write_video(elsewhere / "holiday.mov", audio=True)
    result = cli("upload", str(video), "--unique-id", "holidays", "--tag", "beach", config=config_file)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"uploaded {video}: VI")
    (received,) = sandbox.received()
    assert received.unique_id == "holidays" and received.folder_tags == ["beach"]
    again = cli("upload", str(video), config=config_file)
    assert again.returncode == 0 and again.stdout.startswith(f"already uploaded {video}")
    assert len(sandbox.received()) == 1


def test_upload_uses_the_watched_folders_settings_and_reports_rejections(
    config_file: Path, tmp_path: Path, sandbox: Sandbox
) -> None:
    inside = write_video(tmp_path / "watched" / "door.mp4")
    bad = write_video(tmp_path / "bad.mp4", codec="mpeg4")
    result = cli("upload", str(inside), str(bad), config=config_file)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"uploaded {inside}")
    assert lines[1] == f"rejected {bad}: video codec mpeg4 is not one of h264, hevc, vp9"
    (received,) = sandbox.received()
    assert received.unique_id == "cli" and received.folder_tags == ["cli"]


def test_status_shows_progress_pause_and_recent_errors(config_file: Path, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    folder = tmp_path / "watched"
    ledger.record_seen(folder / "big.mp4", folder, "cli", Version(4 << 20, 1, 1, 1))
    row = ledger.get(folder / "big.mp4")
    assert row is not None and ledger.mark_queued(row, "fp", {})
    claimed = ledger.claim([folder])
    assert claimed is not None
    ledger.mark_progress(claimed.id, 1 << 20)
    ledger.record_seen(folder / "old.mp4", folder, "cli", Version(10, 1, 2, 1))
    old = ledger.get(folder / "old.mp4")
    assert old is not None
    ledger.mark_rejected(old.id, "video codec mpeg4 is not one of h264, hevc, vp9")
    ledger.set_pause(Pause(reason="the account's balance is insufficient", since=1e9, until=1e9 + 600, kind="account"))
    Pacer(ledger, 1.0).limited(retry_after=None)
    ledger.close()
    text = cli("status", config=config_file).stdout
    assert "pace: 0.5 uploads/s (one every 2.03 s), learned from the API's 0429 answers; the ceiling is 1/s" in text
    assert f"uploading {folder / 'big.mp4'} (attempt 1)" in text
    assert "25.0%" in text and "1.0 MiB of 4.0 MiB" in text
    assert "PAUSED since" in text and "the account's balance is insufficient" in text
    assert "to lift it: it lifts by itself after the next trial upload that is accepted" in text
    assert "video codec mpeg4" in text
    document = json.loads(cli("status", "--json", config=config_file).stdout)
    assert document["uploading"][0]["bytes_sent"] == 1 << 20 and document["paused"]["kind"] == "account"
    assert document["pace"]["rate"] == 0.5 and document["pace"]["ceiling"] == 1.0


def test_status_watch_redraws_until_interrupted(config_file: Path, tmp_path: Path) -> None:
    Ledger(tmp_path / "ledger.db").close()
    watcher = subprocess.Popen(
        [*COMMAND, "status", "--watch", "--interval", "0.2", "-c", str(config_file)],
        stdout=subprocess.PIPE,
        env=environment(),
    )
    assert watcher.stdout is not None
    output = b""
    # Whole redraws are counted as they arrive, however slowly a busy machine produces them.
    while output.count(b"\x1b[2J") < 3:
        chunk = os.read(watcher.stdout.fileno(), 65536)
        assert chunk, f"status --watch ended early: {output!r}"
        output += chunk
    watcher.send_signal(signal.SIGINT)
    rest, _ = watcher.communicate(timeout=30)
    assert watcher.returncode == 0
    assert b"the ledger is empty" in output + rest


def test_sighup_switches_to_a_good_config_and_keeps_the_old_one_when_the_new_one_is_bad(
    config_file: Path, tmp_path: Path, sandbox: Sandbox
) -> None:
    daemon = start_daemon(config_file)
    lines: list[dict[str, Any]] = []

    def read_log() -> None:
        assert daemon.stderr is not None
        lines.extend(json.loads(line) for line in daemon.stderr if line.startswith("{"))

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(line["event"] == "started" for line in lines), what="the daemon to start")
        good = yaml.safe_load(config_file.read_text())
        config_file.write_text("folders: [{path: watched, latitude: north}]\n")
        daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: any("the new config is invalid" in line["event"] for line in lines), what="the refusal")
        first = write_video(tmp_path / "watched" / "first.mp4")
        wait_until(lambda: uploaded(tmp_path / "ledger.db", first), what="an upload under the old config")
        good["folders"][0]["tags"] = ["reloaded"]
        config_file.write_text(yaml.safe_dump(good))
        daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: sum(line["event"] == "started" for line in lines) == 2, what="the restart")
        second = write_video(tmp_path / "watched" / "second.mp4", seconds=2)
        wait_until(lambda: uploaded(tmp_path / "ledger.db", second), what="an upload under the new config")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    tags = {video.filename: video.folder_tags for video in sandbox.received()}
    assert tags == {"first.mp4": ["cli"], "second.mp4": ["reloaded"]}
    refusal = next(line for line in lines if "the new config is invalid" in line["event"])
    assert any("folders[0].latitude: 'north' is not a decimal number" in p for p in refusal["problems"])


def test_the_key_never_reaches_the_log_or_the_ledger_whatever_the_server_says(
    config_file: Path, tmp_path: Path, sandbox: Sandbox
) -> None:
    sandbox.inject("invalid_field", msg=f"the key {API_KEY} is not allowed to set camera_model")
    video = write_video(tmp_path / "watched" / "a.mp4")
    result = cli("run", "--once", config=config_file)
    ledger = Ledger(tmp_path / "ledger.db")
    row = ledger.get(video)
    ledger.close()
    assert row is not None and row.state == FAILED
    assert row.error is not None and "the key [the API key] is not allowed" in row.error
    assert API_KEY not in result.stderr + result.stdout
    status = cli("status", "--json", config=config_file).stdout + cli("list", config=config_file).stdout
    assert API_KEY not in status and "[the API key]" in status


def test_status_and_list_show_control_characters_escaped(config_file: Path, tmp_path: Path) -> None:
    hostile = tmp_path / "watched" / "clip\x1b]0;owned\x07\x1b[2J\u202e.mp4"
    hostile.write_bytes(b"not a video at all, whatever its name says")
    cli("run", "--once", config=config_file)
    shown = cli("status", config=config_file).stdout + cli("list", config=config_file).stdout
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
    assert "clip\\x1b]0;owned\\x07\\x1b[2J\\u202e.mp4" in shown


def test_status_and_list_never_make_a_ledger(config_file: Path, tmp_path: Path) -> None:
    for command in ("status", "list"):
        result = cli(command, config=config_file)
        assert result.returncode == 69
        assert "there is no ledger at" in result.stderr
    assert not (tmp_path / "ledger.db").exists()


def test_run_once_ends_with_one_summary_line(config_file: Path, tmp_path: Path) -> None:
    write_video(tmp_path / "watched" / "good.mp4")
    write_video(tmp_path / "watched" / "old.mp4", codec="mpeg4")
    result = cli("run", "--once", config=config_file)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "run --once: 1 uploaded, 1 rejected, 0 failed, 0 left for later"


def test_status_into_a_closed_pipe_ends_quietly(config_file: Path, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    folder = tmp_path / "watched"
    for number in range(2000):
        ledger.record_seen(folder / f"clip{number}.mp4", folder, "cli", Version(10, 1, number, 1))
    ledger.close()
    piped = subprocess.run(
        f"{sys.executable} -m memories_ingest.cli list -c {config_file} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        env=environment(),
        timeout=60,
    )
    assert piped.stdout.startswith("pending") and piped.stderr == ""


def test_log_lines_carry_their_utc_offset(config_file: Path, tmp_path: Path) -> None:
    write_video(tmp_path / "watched" / "a.mp4")
    result = cli("run", "--once", config=config_file)
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert events and all(
        re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", e["timestamp"]) for e in events
    )
    uploaded_event = next(e for e in events if e["event"] == "uploaded")
    assert {"path", "unique_id", "state"} <= set(uploaded_event)


def test_upload_draws_one_clean_progress_line_that_log_lines_never_share(
    config_file: Path, tmp_path: Path, sandbox: Sandbox
) -> None:
    staging = write_video(tmp_path / "staging.mp4", faststart=True)
    video = faststart_padding(staging, 24 << 20).rename(tmp_path / "big.mp4")
    sandbox.inject("trickle", bytes_per_second=8 << 20)
    controller, terminal = pty.openpty()
    upload = subprocess.Popen(
        [*COMMAND, "upload", str(video), "-c", str(config_file)],
        stdout=subprocess.PIPE,
        stderr=terminal,
        env=environment(),
    )
    os.close(terminal)
    drawn = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:
            break
        if not chunk:
            break
        drawn += chunk
    os.close(controller)
    stdout, _ = upload.communicate(timeout=60)
    assert upload.returncode == 0 and stdout.startswith(b"uploaded ")
    redraws = [line for line in drawn.split(b"\r") if line.startswith(b"big.mp4 [")]
    assert redraws and all(line.endswith(b"\x1b[K") or b"\x1b[K\n" in line for line in redraws)
    assert b"of 24.0 MiB" in drawn and b"ETA " in drawn
    for line in drawn.split(b"\n"):
        # A log line starts a line of its own: the bar never runs into it.
        assert b"big.mp4 [" not in line or b"uploaded" not in line.split(b"big.mp4 [")[-1]


def big(tmp_path: Path, folder: str, megabytes: int = 24) -> Path:
    staging = write_video(tmp_path / f"staging-{folder}.mp4", faststart=True)
    return faststart_padding(staging, megabytes << 20).rename(tmp_path / folder / "big.mp4")


def test_a_daemon_starting_beside_an_upload_leaves_its_row_alone(
    config_file: Path, tmp_path: Path, sandbox: Sandbox
) -> None:
    video = big(tmp_path, "watched")
    sandbox.inject("trickle", bytes_per_second=4 << 20)
    upload = spawned(
        subprocess.Popen(
            [*COMMAND, "upload", str(video), "-c", str(config_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(),
        )
    )
    wait_until(lambda: (row := row_of(tmp_path, video)) is not None and row.state == "uploading", 30, "the upload")
    daemon = start_daemon(config_file)
    try:
        stdout, _ = upload.communicate(timeout=90)
        assert upload.returncode == 0 and stdout.startswith("uploaded ")
        wait_until(lambda: "last heartbeat" in cli("status", config=config_file).stdout, 30, "the daemon at work")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)
    assert len(sandbox.received()) == 1, "the daemon never took the file over from a live upload"


def test_an_upload_that_died_mid_file_is_taken_over_by_the_next(
    config_file: Path, tmp_path: Path, sandbox: Sandbox
) -> None:
    (tmp_path / "elsewhere").mkdir()
    video = big(tmp_path, "elsewhere")
    sandbox.inject("trickle", bytes_per_second=2 << 20)
    first = spawned(
        subprocess.Popen([*COMMAND, "upload", str(video), "-c", str(config_file)], env=environment(), text=True)
    )
    wait_until(lambda: (row := row_of(tmp_path, video)) is not None and row.state == "uploading", 30, "the upload")
    first.kill()
    first.wait(timeout=30)
    again = cli("upload", str(video), config=config_file)
    assert again.returncode == 0 and again.stdout.startswith(f"uploaded {video}: VI"), again.stdout + again.stderr
    assert [video_.filename for video_ in sandbox.received()] == ["big.mp4"]


HEAVY = ("av", "werkzeug", "requests", "pydantic", "sqlite_utils", "structlog", "prometheus_client", "watchdog")
LOADED = """
import json, sys
from memories_ingest import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def modules_loaded_by(*args: str) -> set[str]:
    """Every module a command leaves loaded, run in a fresh interpreter: what it cost, counted, not timed."""
    done = subprocess.run(
        [sys.executable, "-c", LOADED, *args], capture_output=True, text=True, env=environment(), timeout=120
    )
    loaded: list[str] = json.loads(done.stderr.strip().splitlines()[-1])
    return {name.partition(".")[0] for name in loaded}


def test_help_and_the_ledger_commands_load_no_heavy_dependency(config_file: Path, tmp_path: Path) -> None:
    Ledger(tmp_path / "ledger.db").close()
    assert not modules_loaded_by("--help") & {*HEAVY, "yaml", "sqlite3"}
    for command in ("status", "list", "resume"):
        assert not modules_loaded_by(command, "-c", str(config_file)) & set(HEAVY), command
    # The check can see what it looks for: `check` validates the config, with pydantic.
    assert {"pydantic", "structlog"} <= modules_loaded_by("check", "-c", str(config_file))
