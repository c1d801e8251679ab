"""Fixtures shared by every test module."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from memories_ingest.api import V1
from memories_ingest.config import Config, parse
from memories_ingest.ledger import Ledger, LedgerError, Pause, Row
from memories_ingest.pacing import RetryPolicy
from memories_ingest.samples import write_video
from memories_ingest.sandbox import Sandbox
from memories_ingest.service import Daemon
from memories_ingest.signals import Signals
from memories_ingest.uploader import Client


@pytest.fixture
def make_video(tmp_path: Path) -> Callable[..., Path]:
    """A factory for real sample videos in tmp_path: ``make_video("clip.mkv", codec="vp9", audio=True)``.

    Keyword arguments are those of :func:`memories_ingest.samples.write_video`.
    """

    def make(name: str = "clip.mp4", **options: Any) -> Path:
        return write_video(tmp_path / name, **options)

    return make


API_KEY = "test-key"
FAST_RETRIES = RetryPolicy(base=0.1, factor=2.0, cap=0.5, jitter=0.1)


@pytest.fixture
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """The API emulator on a free loopback port; fast enough for tests, as strict as the real API.

    It speaks v1.2 unless a test asks for a dialect: ``@pytest.mark.parametrize("sandbox", DIALECTS, indirect=True)``.
    """
    dialect = getattr(request, "param", V1)
    with Sandbox(api_key=API_KEY, dialect=dialect, rate_per_second=20, parse_seconds=0.2) as server:
        yield server


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll a condition on a real clock; tests check behaviour, so the timeout is generous."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        pause.wait(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# A mountinfo with what parsing must get right: an escaped path, stacked mounts, network filesystems, a bad line.
SAMPLE_MOUNTINFO = rb"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
35 22 0:40 / /mnt/nas rw,relatime shared:20 - nfs4 nas:/export/cams rw,vers=4.2
36 35 0:41 / /mnt/nas/local\040copy rw - tmpfs tmpfs rw
37 22 0:42 / /srv/share rw,nosuid shared:5 master:2 - cifs //box/share rw
38 22 0:43 / /media/cloud rw - fuse.rclone remote: rw
39 22 0:44 / /mnt/stack rw - ext4 /dev/sdb1 rw
40 39 0:45 / /mnt/stack rw - smb3 //nas/stack rw
a line the kernel never writes
"""


class Pipeline:
    """A daemon running in this process against the sandbox, on folders under tmp_path."""

    def __init__(self, tmp_path: Path, sandbox: Sandbox, document: dict[str, Any]) -> None:
        self.tmp_path = tmp_path
        self.sandbox = sandbox
        self.config: Config = parse(document, tmp_path / "config.yaml")
        self.ledger = Ledger(self.config.ledger)
        self.client = Client(self.config.api.base_url, API_KEY, connect_timeout=2, read_timeout=5)
        self.daemon: Daemon | None = None
        self.thread: threading.Thread | None = None
        self.exit_code: int | None = None

    def start(self, once: bool = False) -> Pipeline:
        self.daemon = Daemon(
            self.config,
            self.ledger,
            self.client,
            once=once,
            grace_seconds=2,
            signals=Signals(),
            policy=FAST_RETRIES,
        )
        daemon = self.daemon

        def run() -> None:
            self.exit_code = daemon.run()

        self.thread = threading.Thread(target=run, name="daemon-under-test")
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.daemon is not None and self.thread is not None:
            self.daemon.request_stop()
            self.thread.join(timeout=15)
            assert not self.thread.is_alive(), "the daemon did not stop"
        self.daemon = None

    def row(self, path: Path) -> Row | None:
        return self.ledger.get(path)

    def wait_state(self, path: Path, *states: str, timeout: float = 20.0) -> Row:
        def reached() -> Row | None:
            row = self.ledger.get(path)
            return row if row is not None and row.state in states else None

        row: Row = wait_until(reached, timeout, f"{path.name} to become {'/'.join(states)}")
        return row

    def received_names(self) -> list[str]:
        return sorted(video.filename for video in self.sandbox.received())


@pytest.fixture
def pipeline(tmp_path: Path, sandbox: Sandbox) -> Iterator[Callable[..., Pipeline]]:
    """Build (not start) a pipeline: ``pipeline(folders=[{...}], watch={...})``; folders default to one."""
    made: list[Pipeline] = []

    def build(**sections: Any) -> Pipeline:
        watched = tmp_path / "watched"
        watched.mkdir(exist_ok=True)
        document: dict[str, Any] = {
            "api": {"base_url": sandbox.url},
            "ledger": str(tmp_path / "ledger.db"),
            "watch": {"settle_seconds": 0.3, "rescan_seconds": 60},
            "upload": {"rate_per_second": 20, "account_check_seconds": 0.5},
            "folders": [{"path": str(watched), "unique_id": "test-scope"}],
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(document.get(key), dict):
                document[key] = {**document[key], **value}
            else:
                document[key] = value
        built = Pipeline(tmp_path, sandbox, document)
        made.append(built)
        return built

    yield build
    for built in made:
        built.stop()
        built.client.close()
        built.ledger.close()


class RawServer:
    """A bare TCP server on loopback whose connection handler a test writes: stalls, redirects, trickles."""

    def __init__(self, handle: Callable[[socket.socket], None], receive_buffer: int | None = None) -> None:
        self.handle = handle
        self.listener = socket.create_server(("127.0.0.1", 0))
        if receive_buffer:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)
            threading.Thread(target=self._run, args=(connection,), daemon=True).start()

    def _run(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handle(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.close()


def read_request_head(connection: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = connection.recv(65536)
        if not chunk:
            break
        head += chunk
    return head


def daemon_config(tmp_path: Path, sandbox: Sandbox, **sections: Any) -> Path:
    """A config file for a daemon run as a process: one folder, `watched`, against the sandbox.

    Keyword arguments replace sections (``upload={"rate_per_second": 1}``), or are merged into them.
    """
    (tmp_path / "watched").mkdir(exist_ok=True)
    document: dict[str, Any] = {
        "api": {"base_url": sandbox.url},
        "ledger": "ledger.db",
        "watch": {"settle_seconds": 0.2},
        "upload": {"rate_per_second": 20},
        "folders": [{"path": "watched", "unique_id": "test-scope"}],
    }
    for key, value in sections.items():
        document[key] = {**document[key], **value} if isinstance(value, dict) and key in document else value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


COMMAND = [sys.executable, "-m", "memories_ingest.cli"]


def run_cli(config: Path, *args: str, key: str = API_KEY) -> subprocess.CompletedProcess[str]:
    """One `memories-ingest` command on this config, in a process of its own."""
    return subprocess.run(
        [*COMMAND, *args, "-c", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "MEMORIES_API_KEY": key},
        timeout=120,
    )


@contextlib.contextmanager
def read_ledger(tmp_path: Path) -> Iterator[Ledger | None]:
    """The ledger under tmp_path, opened as `status` opens it: None while no daemon has made it."""
    try:
        ledger = Ledger(tmp_path / "ledger.db", create=False)
    except LedgerError:
        yield None
        return
    try:
        yield ledger
    finally:
        ledger.close()


def row_of(tmp_path: Path, path: Path) -> Row | None:
    with read_ledger(tmp_path) as ledger:
        return None if ledger is None else ledger.get(path)


def pause_of(tmp_path: Path) -> Pause | None:
    with read_ledger(tmp_path) as ledger:
        return None if ledger is None else ledger.pause()


_spawned: list[subprocess.Popen[str]] = []


def spawned(process: subprocess.Popen[str]) -> subprocess.Popen[str]:
    """Remember a daemon a test started, so that a failing test never leaves it running."""
    _spawned.append(process)
    return process


@pytest.fixture(autouse=True)
def _reap_spawned() -> Iterator[None]:
    yield
    while _spawned:
        process = _spawned.pop()
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)


def signal_pending(pid: int, number: int) -> bool:
    """Whether a signal waits, not yet delivered, for the process (its threads' or its shared pending set)."""
    bit = 1 << (number - 1)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, mask = line.partition(":")
        if name in ("SigPnd", "ShdPnd") and int(mask, 16) & bit:
            return True
    return False
