"""Indexing results: list_videos asked by videoNo in each row's scope, and callbacks that are only hints."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import structlog.testing
from requests_toolbelt import MultipartEncoder

from memories_ingest.files import Version
from memories_ingest.indexer import CallbackListener, Indexer, callback_token, callback_url
from memories_ingest.ledger import Ledger, Row
from memories_ingest.samples import write_video
from memories_ingest.sandbox import UPLOAD_PATH, Sandbox
from memories_ingest.states import INDEX_FAILED, INDEXED, UPLOADED
from memories_ingest.uploader import Client, ListedVideo
from memories_ingest.worker import Worker

from conftest import API_KEY, Pipeline, read_request_head, wait_until

Build = Callable[..., Pipeline]
FOLDER = Path("/srv/cameras")


@contextlib.contextmanager
def running(*workers: Worker) -> Iterator[None]:
    threads = [threading.Thread(target=worker.run, name=f"{worker.name}-under-test") for worker in workers]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.stop.set()
        for worker, thread in zip(workers, threads, strict=True):
            thread.join(timeout=10)
            assert not thread.is_alive(), f"{worker.name} did not stop"
            assert worker.fatal is None


def sent(sandbox: Sandbox, unique_id: str | None = "scope") -> str:
    """A video the sandbox holds, as if this daemon had uploaded it; returns its videoNo."""
    fields = [("unique_id", unique_id)] if unique_id else []
    encoder = MultipartEncoder(fields=[*fields, ("file", ("v.mp4", b"\x00" * 100, "video/mp4"))])
    answer = requests.post(
        sandbox.url + UPLOAD_PATH,
        data=encoder,
        headers={"Content-Type": encoder.content_type, "Authorization": API_KEY},
        timeout=5,
    ).json()
    video_no: str = answer["data"]["videoNo"]
    return video_no


def uploaded(ledger: Ledger, name: str, video_no: str, unique_id: str | None = "scope") -> Row:
    """A row as an upload leaves it, for a file the indexer never needs to see."""
    ledger.record_seen(FOLDER / name, FOLDER, unique_id, Version(100, 1, hash(name) % 10_000, 1))
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
def client(sandbox: Sandbox) -> Iterator[Client]:
    made = Client(sandbox.url, API_KEY, connect_timeout=2, read_timeout=5)
    yield made
    made.close()


@pytest.fixture
def listening(ledger: Ledger, client: Client) -> Iterator[tuple[CallbackListener, Indexer]]:
    indexer = Indexer(stop=threading.Event(), ledger=ledger, client=client, poll_seconds=None)
    listener = CallbackListener(
        stop=threading.Event(), ledger=ledger, indexer=indexer, listen="127.0.0.1:0", token=callback_token(ledger)
    )
    with running(listener, indexer):
        yield listener, indexer


def post(listener: CallbackListener, body: object, path: str | None = None) -> requests.Response:
    where = path if path is not None else f"/hooks/{listener.token}"
    return requests.post(listener.url + where, json=body, timeout=5)


def test_the_callback_token_is_made_once_and_kept_in_the_ledger(ledger: Ledger) -> None:
    token = callback_token(ledger)
    assert len(token) == 32 and callback_token(ledger) == token
    assert callback_url("https://nas.example/cb/", token) == f"https://nas.example/cb/{token}"


def test_callbacks_are_hints_confirmed_with_list_videos(
    ledger: Ledger, sandbox: Sandbox, listening: tuple[CallbackListener, Indexer]
) -> None:
    listener, _ = listening
    sandbox.fail_next_parse("no video frames")
    failing = uploaded(ledger, "bad.mp4", sent(sandbox))
    parsing = uploaded(ledger, "good.mp4", sent(sandbox))
    wait_until(lambda: sandbox.video_status(parsing.video_no or "") == "PARSE", what="the sandbox to parse")
    assert post(listener, {"videoNo": failing.video_no, "status": "FAIL"}).status_code == 200
    # A forged FAILED for a video memories.ai parsed: list_videos says PARSE, and that is what counts.
    assert post(listener, {"videoNo": parsing.video_no, "status": "FAILED", "cause": "forged"}).status_code == 200
    wait_until(lambda: ledger.get_id(failing.id).state == INDEX_FAILED, what="the confirmed failure")
    wait_until(lambda: ledger.get_id(parsing.id).state == INDEXED, what="the confirmed result")
    assert ledger.get_id(failing.id).error == "no video frames"
    assert ledger.get_id(parsing.id).error is None


def test_a_forged_callback_changes_nothing_the_api_does_not_confirm(ledger: Ledger, tmp_path: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=100, parse_seconds=3600) as never_parses:
        client = Client(never_parses.url, API_KEY, connect_timeout=2, read_timeout=5)
        indexer = Indexer(stop=threading.Event(), ledger=ledger, client=client, poll_seconds=None)
        listener = CallbackListener(
            stop=threading.Event(), ledger=ledger, indexer=indexer, listen="127.0.0.1:0", token="t" * 32
        )
        row = uploaded(ledger, "a.mp4", sent(never_parses))
        with running(listener, indexer):
            assert post(listener, {"videoNo": row.video_no, "status": "PARSE"}).status_code == 200
            wait_until(lambda: never_parses.list_queries(), what="the indexer to ask list_videos")
        client.close()
    assert ledger.get_id(row.id).state == UPLOADED


def test_only_the_secret_path_takes_callbacks(
    ledger: Ledger, sandbox: Sandbox, listening: tuple[CallbackListener, Indexer]
) -> None:
    listener, _ = listening
    row = uploaded(ledger, "a.mp4", sent(sandbox))
    for path in ["/", "/hooks", "/hooks/not-the-token", f"/{listener.token[:-1]}"]:
        assert post(listener, {"videoNo": row.video_no, "status": "PARSE"}, path).status_code == 404
    assert sandbox.list_queries() == []
    assert post(listener, {"videoNo": row.video_no, "status": "PARSE"}, f"/{listener.token}/").status_code == 200


def test_callbacks_for_videos_not_ours_are_answered_and_never_asked_about(
    sandbox: Sandbox, listening: tuple[CallbackListener, Indexer]
) -> None:
    listener, _ = listening
    answer = post(listener, {"videoNo": "VI-NOT-OURS", "status": "PARSE"})
    assert (answer.status_code, answer.json()) == (200, {"ok": True})
    assert sandbox.list_queries() == []


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
def test_malformed_callbacks_get_400(listening: tuple[CallbackListener, Indexer], body: bytes) -> None:
    listener, _ = listening
    answer = requests.post(
        f"{listener.url}/{listener.token}", data=body, headers={"Content-Type": "application/json"}, timeout=5
    )
    assert answer.status_code == 400
    assert "error" in answer.json()


def test_hostile_and_idle_connections_never_lock_out_a_genuine_callback(
    ledger: Ledger, sandbox: Sandbox, listening: tuple[CallbackListener, Indexer]
) -> None:
    listener, _ = listening
    row = uploaded(ledger, "a.mp4", sent(sandbox))
    secret = f"/{listener.token}".encode()
    host, port = listener.server.socket.getsockname()[:2]
    assert requests.get(listener.url, timeout=5).status_code == 501
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(b"POST " + secret + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        assert b" 413 " in read_request_head(raw)
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(b"POST " + secret + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        assert b" 411 " in read_request_head(raw)
    idle = []
    for _ in range(40):
        connection = socket.create_connection((host, port), timeout=5)
        connection.sendall(b"POST " + secret + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        idle.append(connection)
    try:
        wait_until(lambda: sandbox.video_status(row.video_no or "") == "PARSE", what="the sandbox to parse")

        def genuine() -> bool:
            try:
                return post(listener, {"videoNo": row.video_no, "status": "PARSE"}).status_code == 200
            except requests.RequestException:
                return False

        wait_until(genuine, 30, "a genuine callback to get through")
        wait_until(lambda: ledger.get_id(row.id).state == INDEXED, what="the confirmed result")
    finally:
        for connection in idle:
            connection.close()


def test_polls_ask_for_the_waiting_videos_by_number_in_each_rows_own_scope(
    ledger: Ledger, sandbox: Sandbox, client: Client
) -> None:
    rows = [uploaded(ledger, f"a{n}.mp4", sent(sandbox, "cam-a"), "cam-a") for n in range(3)]
    rows.append(uploaded(ledger, "b.mp4", sent(sandbox, None), None))
    wait_until(lambda: all(sandbox.video_status(r.video_no or "") == "PARSE" for r in rows), what="parsing")
    indexer = Indexer(stop=threading.Event(), ledger=ledger, client=client, poll_seconds=60)
    assert indexer.poll() == 4
    assert {ledger.get_id(row.id).state for row in rows} == {INDEXED}
    queries = sandbox.list_queries()
    assert len(queries) == 2
    by_scope = {query.get("unique_id"): query for query in queries}
    assert sorted(by_scope["cam-a"]["video_nos"]) == sorted(r.video_no or "" for r in rows[:3])
    assert by_scope[None]["video_nos"] == [rows[3].video_no], "no unique_id: the scope `default`"
    assert ledger.awaiting_index() == []


def test_polls_ask_about_at_most_a_hundred_videos_at_a_time(ledger: Ledger, sandbox: Sandbox, client: Client) -> None:
    numbers = [sent(sandbox) for _ in range(3)]
    for n in range(205):
        uploaded(ledger, f"v{n}.mp4", numbers[n % 3] if n < 3 else f"VI-GONE-{n}")
    Indexer(stop=threading.Event(), ledger=ledger, client=client, poll_seconds=60).poll()
    assert [len(query["video_nos"]) for query in sandbox.list_queries()] == [100, 100, 5]


def test_a_status_the_daemon_does_not_know_is_logged_once_and_the_row_waits(ledger: Ledger, client: Client) -> None:
    row = uploaded(ledger, "a.mp4", "VI-X")
    indexer = Indexer(stop=threading.Event(), ledger=ledger, client=client, poll_seconds=60)
    odd = ListedVideo(video_no="VI-X", name=None, size=None, created_at=None, status="TRANSCODING", cause="null")
    with structlog.testing.capture_logs() as logs:
        assert indexer.record(odd) == 0
        assert indexer.record(odd) == 0
    assert [entry["status"] for entry in logs] == ["TRANSCODING"]
    assert ledger.get_id(row.id).state == UPLOADED


def test_indexing_events_name_the_file_its_scope_and_state(ledger: Ledger, sandbox: Sandbox, client: Client) -> None:
    row = uploaded(ledger, "a.mp4", sent(sandbox))
    wait_until(lambda: sandbox.video_status(row.video_no or "") == "PARSE", what="parsing")
    with structlog.testing.capture_logs() as logs:
        Indexer(stop=threading.Event(), ledger=ledger, client=client, poll_seconds=60).poll()
    (event,) = [entry for entry in logs if entry["event"] == "indexed"]
    assert (event["path"], event["unique_id"], event["state"]) == (str(FOLDER / "a.mp4"), "scope", INDEXED)


def test_callbacks_from_memories_ai_end_in_confirmed_results(pipeline: Build, sandbox: Sandbox, tmp_path: Path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    run = pipeline(indexing={"listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}/hooks"})
    run.start()
    good = write_video(tmp_path / "watched" / "good.mp4", seconds=1.0)
    run.wait_state(good, INDEXED)
    sandbox.fail_next_parse("the video stream could not be decoded")
    bad = write_video(tmp_path / "watched" / "bad.mp4", seconds=1.5)
    row = run.wait_state(bad, INDEX_FAILED)
    assert row.error == "the video stream could not be decoded"
