"""sd_notify, the watchdog, /healthz, /metrics and the status page, against real sockets and the sandbox."""

from __future__ import annotations

import functools
import os
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from memories_ingest import view
from memories_ingest.api import Outcome
from memories_ingest.ledger import Ledger
from memories_ingest.metrics import Metrics
from memories_ingest.monitor import LedgerCheck
from memories_ingest.notifier import Notifier, notify
from memories_ingest.samples import write_video
from memories_ingest.sandbox import Sandbox
from memories_ingest.service import Daemon
from memories_ingest.uploader import SnapshotReader
from memories_ingest.view import status_line

from conftest import Pipeline, wait_until


class NotifyListener:
    """What systemd's end of $NOTIFY_SOCKET would receive: one datagram per notify() call."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)

    def receive(self, timeout: float = 10.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        received: list[str] = []
        self.sock.settimeout(0)
        while True:
            try:
                received.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return received

    def wait_for(self, message: str, timeout: float = 10.0) -> list[str]:
        """Everything received up to and including the first datagram that starts with message."""
        deadline = time.monotonic() + timeout
        received: list[str] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {message!r} within {timeout} s; received {received}")
            try:
                received.append(self.receive(left))
            except TimeoutError:
                continue
            if received[-1].startswith(message):
                return received

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    """$NOTIFY_SOCKET as systemd sets it for a Type=notify unit, on an abstract socket, with WatchdogSec=0.2."""
    name = f"memories-ingest-test-{uuid.uuid4().hex}"
    listener = NotifyListener("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield listener
    listener.close()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port: int = probe.getsockname()[1]
        return port


def monitored(pipeline: Callable[..., Pipeline], **sections: Any) -> tuple[Pipeline, str]:
    port = free_port()
    built = pipeline(monitor={"listen": f"127.0.0.1:{port}"}, **sections)
    return built, f"http://127.0.0.1:{port}"


def running(built: Pipeline) -> Daemon:
    assert built.daemon is not None
    daemon = built.daemon
    wait_until(lambda: len(daemon.threads) == len(daemon.workers), what="every worker thread to start")
    return daemon


def end_thread(daemon: Daemon, name: str) -> None:
    """End one worker's thread the way a bug would, while the rest of the daemon runs on."""
    worker = next(w for w in daemon.workers if w.name == name)
    worker.stop = threading.Event()
    worker.stop.set()
    if name == "settler":
        daemon.events.wake.set()
    thread = next(t for t in daemon.threads if t.name == name)
    thread.join(timeout=10)
    assert not thread.is_alive()


# -- notify() ---------------------------------------------------------------------------------------------


def test_notify_without_a_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_notify_sends_each_message_as_one_datagram_to_a_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # A short directory: socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="mi-") as directory:
        address = os.path.join(directory, "notify")
        listener = NotifyListener(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        try:
            assert notify("READY=1")
            assert notify("STATUS=watching 2 folders; 3 queued")
            assert notify("WATCHDOG=1")
            assert [listener.receive(), listener.receive(), listener.receive()] == [
                "READY=1",
                "STATUS=watching 2 folders; 3 queued",
                "WATCHDOG=1",
            ]
        finally:
            listener.close()


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"memories-ingest-test-{uuid.uuid4().hex}"
    listener = NotifyListener("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
    try:
        assert notify("READY=1\nSTATUS=ready")
        assert listener.receive() == "READY=1\nSTATUS=ready"
    finally:
        listener.close()


def test_notify_reports_a_socket_nobody_listens_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify("READY=1") is False


def test_the_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_process() -> None:
    assert Notifier({"WATCHDOG_USEC": "60000000"}).watchdog_interval == 30.0
    assert Notifier({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 30.0
    assert Notifier({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert Notifier({}).watchdog_interval is None


def test_status_line_summarises_the_ledger_in_one_line() -> None:
    counts = {
        "pending": 0,
        "queued": 3,
        "uploading": 1,
        "retrying": 0,
        "uploaded": 118,
        "indexed": 2,
        "index_failed": 0,
        "rejected": 1,
        "failed": 0,
        "gone": 0,
    }
    document = {
        "counts": counts,
        "uploading": [{"percent": 45.2}],
        "paused": {"reason": "the account's balance is insufficient\n(HTTP 200)"},
    }
    assert status_line(document, 2) == (
        "watching 2 folders; 3 queued, 1 uploading (45%), 120 uploaded, 1 rejected; "
        "paused: the account's balance is insufficient\\x0a(HTTP 200)"
    )
    assert status_line({**document, "paused": None}, 1, ["settler: its thread has ended"]).endswith(
        "; unhealthy: settler: its thread has ended"
    )


# -- the daemon under systemd -----------------------------------------------------------------------------


def test_the_daemon_sends_ready_then_watchdog_pings_then_stopping(
    pipeline: Callable[..., Pipeline], systemd: NotifyListener
) -> None:
    built = pipeline().start()
    first = systemd.receive()
    assert first.startswith("READY=1\nSTATUS=watching 1 folder; ")
    # Pings keep coming while all is well, however long the machine takes to send them.
    for _ in range(3):
        assert systemd.wait_for("WATCHDOG=1")
    built.stop()
    assert systemd.wait_for("STOPPING=1")


def test_the_watchdog_stops_when_a_worker_thread_ends(
    pipeline: Callable[..., Pipeline], systemd: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(view, "PUBLISH_SECONDS", 0.2)
    built = pipeline().start()
    daemon = running(built)
    systemd.wait_for("WATCHDOG=1")
    end_thread(daemon, "settler")
    wait_until(lambda: daemon.notifier.withheld, what="the watchdog to be withheld")
    # Pings sent before it was withheld are read off now; none may follow in the main loop's next rounds.
    before = systemd.drain()
    after = after_rounds(daemon, systemd, 3)
    assert "WATCHDOG=1" not in after
    status = [m for m in before + after if m.startswith("STATUS=")] or systemd.wait_for("STATUS=")[-1:]
    assert any("unhealthy: settler: its thread has ended" in m for m in status), status


def test_the_watchdog_stops_while_a_worker_is_stalled_and_resumes_when_it_moves_again(
    pipeline: Callable[..., Pipeline], systemd: NotifyListener
) -> None:
    built = pipeline().start()
    daemon = running(built)
    systemd.wait_for("WATCHDOG=1")
    daemon.scanner.first_scan_done.wait(10)

    def stalled() -> bool:
        # Set again at each look: the scanner may still be between its first scan and its sleep on the queue
        # (rescan_seconds, 60 s here), the one moment it refreshes its heartbeat.
        daemon.scanner.heartbeat = time.monotonic() - 10 * daemon.allowances["scanner"]
        return any(p.startswith("scanner: no sign of life") for p in daemon.notifier.withheld)

    wait_until(stalled, what="the watchdog to be withheld for the scanner")
    systemd.drain()
    assert "WATCHDOG=1" not in after_rounds(daemon, systemd, 3)
    daemon.scanner.heartbeat = time.monotonic()
    assert systemd.wait_for("WATCHDOG=1", timeout=5)


def turned_since(daemon: Daemon, moment: float) -> bool:
    return daemon.main_loop_at > moment


def after_rounds(daemon: Daemon, systemd: NotifyListener, rounds: int) -> list[str]:
    """What systemd hears during the daemon's next few rounds of its main loop, however slow they are."""
    for _ in range(rounds):
        wait_until(functools.partial(turned_since, daemon, daemon.main_loop_at), what="a round of the main loop")
    return systemd.drain()


def test_an_upload_is_alive_while_bytes_move_and_stalled_when_they_stop(
    pipeline: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    built = pipeline()
    moving = threading.Event()
    release = threading.Event()

    def hanging_upload(
        reader: SnapshotReader, filename: str, content_type: str, fields: Any, **options: Any
    ) -> Outcome:
        while not release.wait(0.05):
            if moving.is_set() and reader.progress is not None:
                reader.progress(reader.position)
        return Outcome("transient", "released by the test")

    monkeypatch.setattr(built.client, "upload", hanging_upload)
    built.start()
    daemon = running(built)
    daemon.allowances["uploader-1"] = 5.0
    write_video(built.tmp_path / "watched" / "slow.mp4")
    wait_until(daemon.uploaders[0].busy.is_set, what="the upload to start")
    # Moving bytes count as life, long after the loop itself last turned.
    daemon.uploaders[0].heartbeat = time.monotonic() - 60
    moving.set()
    wait_until(lambda: daemon.progress_seen.get("uploader-1", 0) > time.monotonic() - 1, what="bytes to move")
    assert not [p for p in daemon.stalled() if p.startswith("uploader-1")]
    moving.clear()
    wait_until(lambda: "uploader-1: no sign of life for over 5 s" in daemon.stalled(), what="the stall")
    release.set()


# -- /healthz, /metrics and the status page ---------------------------------------------------------------


def get(url: str) -> requests.Response:
    return requests.get(url, timeout=5)


def test_healthz_is_ok_until_a_worker_dies_then_503_with_the_reason(pipeline: Callable[..., Pipeline]) -> None:
    built, url = monitored(pipeline)
    built.start()
    daemon = running(built)
    answer = wait_until(lambda: (r := get(f"{url}/healthz")).status_code == 200 and r, what="healthz to be ok")
    assert answer.text == "ok\n"
    end_thread(daemon, "uploader-1")
    answer = get(f"{url}/healthz")
    assert answer.status_code == 503
    assert "uploader-1: its thread has ended" in answer.text.splitlines()


def test_metrics_count_files_bytes_durations_retries_and_the_pause(
    pipeline: Callable[..., Pipeline], sandbox: Sandbox
) -> None:
    built, url = monitored(pipeline)
    built.start()
    video = write_video(built.tmp_path / "watched" / "garden.mp4")
    sandbox.inject("server_error", status=503)
    built.wait_state(video, "uploaded")

    samples = scrape(f"{url}/metrics")
    assert samples[("memories_ingest_files", (("state", "uploaded"),))] == 1
    assert samples[("memories_ingest_files", (("state", "queued"),))] == 0
    assert samples[("memories_ingest_uploaded_bytes_total", ())] == video.stat().st_size
    assert samples[("memories_ingest_upload_duration_seconds_count", ())] == 1
    assert samples[("memories_ingest_upload_duration_seconds_bucket", (("le", "3600.0"),))] == 1
    assert samples[("memories_ingest_upload_retries_total", (("reason", "transient"),))] == 1
    assert samples[("memories_ingest_upload_retries_total", (("reason", "account"),))] == 0
    assert samples[("memories_ingest_paused", (("reason", "account"),))] == 0
    assert samples[("memories_ingest_oldest_queued_seconds", ())] == 0
    assert samples[("memories_ingest_upload_pace_per_second", ())] == 20

    sandbox.inject("rate_limit")
    limited = write_video(built.tmp_path / "watched" / "shed.mp4", seconds=1.5)
    built.wait_state(limited, "uploaded")
    samples = scrape(f"{url}/metrics")
    assert samples[("memories_ingest_upload_pace_per_second", ())] == 10
    page = get(f"{url}/").text
    assert "Upload pace: 10 uploads/s" in page and "learned from the API&#x27;s 0429 answers" in page

    sandbox.set_account("insufficient_balance")
    waiting = write_video(built.tmp_path / "watched" / "porch.mp4", seconds=2)
    wait_until(lambda: built.ledger.pause() is not None, what="uploads to pause")
    built.wait_state(waiting, "queued")
    samples = scrape(f"{url}/metrics")
    assert samples[("memories_ingest_paused", (("reason", "account"),))] == 1
    assert samples[("memories_ingest_paused", (("reason", "indexing_window"),))] == 0
    assert samples[("memories_ingest_upload_retries_total", (("reason", "account"),))] >= 1
    # Between two probes of the account the file is queued; during one it is uploading.
    waiting_files = sum(samples[("memories_ingest_files", (("state", state),))] for state in ("queued", "uploading"))
    assert waiting_files == 1
    sandbox.set_account("ok")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = get(url)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=")
    families = {family.name: family for family in text_string_to_metric_families(answer.text)}
    for name in (
        "memories_ingest_files",
        "memories_ingest_uploaded_bytes",
        "memories_ingest_upload_duration_seconds",
        "memories_ingest_upload_retries",
        "memories_ingest_paused",
        "memories_ingest_oldest_queued_seconds",
    ):
        assert name in families, name
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }


def test_the_status_page_shows_uploads_and_escapes_file_names(pipeline: Callable[..., Pipeline]) -> None:
    built, url = monitored(pipeline)
    built.start()
    plain = write_video(built.tmp_path / "watched" / "garden.mp4")
    hostile = write_video(built.tmp_path / "watched" / "<script>alert(1)<!--&.mp4", seconds=2)
    built.wait_state(plain, "uploaded")
    built.wait_state(hostile, "uploaded")
    answer = get(f"{url}/")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in answer.headers["Content-Security-Policy"]
    page = answer.text
    assert "garden.mp4" in page
    assert "&lt;script&gt;alert(1)&lt;!--&amp;.mp4" in page
    assert "<script" not in page and "<!--" not in page
    assert '<meta http-equiv="refresh" content="5">' in page
    assert "test-key" not in page


def test_the_endpoint_answers_get_only_404_elsewhere_and_openmetrics_on_request(
    pipeline: Callable[..., Pipeline],
) -> None:
    built, url = monitored(pipeline)
    built.start()
    running(built)
    assert requests.post(f"{url}/healthz", timeout=5).status_code == 405
    assert get(f"{url}/nowhere").status_code == 404
    openmetrics = requests.get(
        f"{url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}, timeout=5
    )
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


def test_a_taken_port_leaves_the_daemon_running_without_the_monitor(pipeline: Callable[..., Pipeline]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        built = pipeline(monitor={"listen": f"127.0.0.1:{taken.getsockname()[1]}"})
        built.start()
        daemon = running(built)
        video = write_video(built.tmp_path / "watched" / "garden.mp4")
        built.wait_state(video, "uploaded")
        assert daemon.monitor is None


# -- the ledger check -------------------------------------------------------------------------------------


def test_the_ledger_check_reports_a_locked_or_missing_ledger(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    check = LedgerCheck(ledger.path, timeout=0.1)
    try:
        assert check.problems() == []
        holder = sqlite3.connect(ledger.path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        assert check.problems() == [f"the ledger {ledger.path} cannot be written: database is locked"]
        holder.execute("ROLLBACK")
        holder.close()
        assert check.problems() == []
        check.close()
        ledger.close()
        for leftover in tmp_path.glob("ledger.db*"):
            leftover.unlink()
        assert check.problems() == [f"the ledger {ledger.path} cannot be written: unable to open database file"]
    finally:
        check.close()
        ledger.close()


def test_metrics_start_with_every_retry_reason_at_zero() -> None:
    metrics = Metrics()
    metrics.answered(Outcome("uploaded", "success", video_no="v1"), 1000, 2.0)
    metrics.answered(Outcome("rate_limited", "HTTP 429"), 1000, 0.1)
    assert metrics.registry.get_sample_value("memories_ingest_uploaded_bytes_total") == 1000
    assert metrics.registry.get_sample_value("memories_ingest_upload_retries_total", {"reason": "rate_limited"}) == 1
    assert metrics.registry.get_sample_value("memories_ingest_upload_retries_total", {"reason": "changed"}) == 0
