"""Indexing results: the callback listener over real HTTP, and polling list_videos against the sandbox."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

import memories_ingest.indexer as indexer_module
from memories_ingest.indexer import REPORTED_FAILED, CallbackListener, Indexer
from memories_ingest.ledger import INDEX_FAILED, INDEXED, UPLOADED, Ledger, Row
from memories_ingest.samples import write_video
from memories_ingest.sandbox import Sandbox
from memories_ingest.uploader import Client
from memories_ingest.worker import Worker

from conftest import API_KEY, Pipeline, read_request_head, wait_until

Build = Callable[..., Pipeline]
FOLDER = Path("/srv/cameras")


@contextlib.contextmanager
def running(worker: Worker) -> Iterator[None]:
    thread = threading.Thread(target=worker.run, name=f"{worker.name}-under-test")
    thread.start()
    try:
        yield
    finally:
        worker.stop.set()
        thread.join(timeout=10)
        assert not thread.is_alive(), f"{worker.name} did not stop"
    assert worker.fatal is None


def uploaded(ledger: Ledger, name: str, video_no: str) -> Row:
    """A row as an upload leaves it, for a file the listener never needs to see."""
    ledger.record_seen(FOLDER / name, FOLDER, "scope", 100, 1, hash(name) % 10_000)
    row = ledger.get(FOLDER / name)
    assert row is not None
    assert ledger.mark_queued(row, f"fp-{name}", {})
    claimed = ledger.claim([FOLDER])
    assert claimed is not None
    ledger.mark_uploaded(claimed, video_no)
    return ledger.get_id(claimed.id)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger(tmp_path / "ledger.db")
    yield opened
    opened.close()


@pytest.fixture
def listener(ledger: Ledger, sandbox: Sandbox) -> Iterator[CallbackListener]:
    client = Client(sandbox.url, API_KEY, connect_timeout=2, read_timeout=5)
    started = CallbackListener(threading.Event(), ledger, client, "127.0.0.1:0")
    with running(started):
        yield started
    client.close()


def post(listener: CallbackListener, body: object, path: str = "/") -> requests.Response:
    return requests.post(listener.url + path, json=body, timeout=5)


def test_callbacks_record_results_for_our_videos_and_ignore_the_rest(
    ledger: Ledger, listener: CallbackListener
) -> None:
    parsed = uploaded(ledger, "a.mp4", "VI-A")
    failed = uploaded(ledger, "b.mp4", "VI-B")
    waiting = uploaded(ledger, "c.mp4", "VI-C")
    before = len(ledger.rows())

    assert post(listener, {"videoNo": "VI-A", "status": "PARSE"}).status_code == 200
    assert post(listener, {"videoNo": "VI-B", "status": "FAILED", "cause": "no video frames"}, "/cb").status_code == 200
    assert post(listener, {"videoNo": "VI-C", "status": "UNPARSE"}).status_code == 200
    unknown = post(listener, {"videoNo": "VI-NOT-OURS", "status": "PARSE"})
    assert (unknown.status_code, unknown.json()) == (200, {"ok": True})
    # A result never goes back: a later FAILED for an indexed video changes nothing.
    assert post(listener, {"videoNo": "VI-A", "status": "FAILED", "cause": "late"}).status_code == 200

    row = ledger.get_id(parsed.id)
    assert (row.state, row.error) == (INDEXED, None)
    assert row.indexed_at is not None
    row = ledger.get_id(failed.id)
    assert (row.state, row.error) == (INDEX_FAILED, "no video frames")
    assert ledger.get_id(waiting.id).state == UPLOADED
    assert len(ledger.rows()) == before
    assert not any(r.video_no == "VI-NOT-OURS" for r in ledger.rows())


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"status": "PARSE"}',
        b'{"videoNo": 5, "status": "PARSE"}',
        b'{"videoNo": "VI-A"}',
        b'{"videoNo": "VI-A", "status": "FAILED", "cause": ["x"]}',
        b"[" * 10_000,
        b"\xff\xfe\x00garbage",
    ],
)
def test_malformed_callbacks_get_400_and_change_nothing(
    ledger: Ledger, listener: CallbackListener, body: bytes
) -> None:
    row = uploaded(ledger, "a.mp4", "VI-A")
    answer = requests.post(listener.url, data=body, headers={"Content-Type": "application/json"}, timeout=5)
    assert answer.status_code == 400
    assert "error" in answer.json()
    assert ledger.get_id(row.id).state == UPLOADED


def test_hostile_requests_are_refused_and_the_listener_lives_on(ledger: Ledger, listener: CallbackListener) -> None:
    row = uploaded(ledger, "a.mp4", "VI-A")
    assert requests.get(listener.url, timeout=5).status_code == 501
    host, port = listener.server.socket.getsockname()[:2]
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        assert b" 413 " in read_request_head(raw)
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        assert b" 411 " in read_request_head(raw)
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(b"\x00\x01garbage that is not HTTP\r\n\r\n")
        raw.recv(1024)
    # A client that promises a body and then goes away costs one thread until it does.
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    assert post(listener, {"videoNo": "VI-A", "status": "PARSE"}).status_code == 200
    assert ledger.get_id(row.id).state == INDEXED


def test_callbacks_from_memories_ai_record_indexed_and_the_cause_of_a_failure(
    pipeline: Build, sandbox: Sandbox, tmp_path: Path
) -> None:
    # The pipeline's ledger file, through a connection of the listener's own, as a separate thread would have it.
    ledger = Ledger(tmp_path / "ledger.db")
    client = Client(sandbox.url, API_KEY, connect_timeout=2, read_timeout=5)
    listener = CallbackListener(threading.Event(), ledger, client, "127.0.0.1:0")
    callback = f"{listener.url}/hooks/memories"
    run = pipeline(folders=[{"path": str(tmp_path / "watched"), "unique_id": "test-scope", "callback": callback}])
    try:
        with running(listener):
            run.start()
            good = write_video(tmp_path / "watched" / "good.mp4", seconds=1.0)
            row = run.wait_state(good, INDEXED)
            assert row.indexed_at is not None
            sandbox.fail_next_parse("the video stream could not be decoded")
            bad = write_video(tmp_path / "watched" / "bad.mp4", seconds=1.5)
            # The callback carries no cause: the listener asks list_videos for it.
            row = wait_until(
                lambda: (r := run.ledger.get(bad)) and r.state == INDEX_FAILED and r.error != REPORTED_FAILED and r,
                20,
                "the cause of the failure",
            )
            assert row.error == "the video stream could not be decoded"
    finally:
        run.stop()
        client.close()
        ledger.close()


def test_polling_records_indexed_and_failed_with_the_cause(pipeline: Build, tmp_path: Path) -> None:
    run = pipeline().start()
    good = write_video(tmp_path / "watched" / "good.mp4", seconds=1.0)
    run.wait_state(good, UPLOADED)
    run.sandbox.fail_next_parse("unsupported pixel format")
    bad = write_video(tmp_path / "watched" / "bad.mp4", seconds=1.5)
    run.wait_state(bad, UPLOADED)
    indexer = Indexer(threading.Event(), run.ledger, run.client, poll_seconds=0.2)
    with running(indexer):
        good_row = run.wait_state(good, INDEXED)
        bad_row = run.wait_state(bad, INDEX_FAILED)
    assert good_row.indexed_at is not None
    assert bad_row.error == "unsupported pixel format"
    assert bad_row.video_no is not None
    assert run.ledger.awaiting_index() == []


def test_polling_pages_back_to_uploads_behind_newer_videos(
    pipeline: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = pipeline().start()
    for number in range(4):
        write_video(tmp_path / "watched" / f"clip-{number}.mp4", seconds=1.0 + 0.1 * number)
    wait_until(lambda: len(run.ledger.awaiting_index()) == 4, 30, "four uploads")
    wait_until(lambda: all(run.sandbox.video_status(r.video_no or "") == "PARSE" for r in run.ledger.rows()), 10)
    # One video a page: the oldest upload is on the fourth page of newest-first results.
    monkeypatch.setattr(indexer_module, "PAGE_SIZE", 1)
    indexer = Indexer(threading.Event(), run.ledger, run.client, poll_seconds=60)
    assert indexer.poll() == 4
    assert {r.state for r in run.ledger.rows()} == {INDEXED}
