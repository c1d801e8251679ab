"""The HTTP client: how the body is read, what the network does to an upload, and what list_videos finds."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from memories_ingest.api import Outcome
from memories_ingest.files import fingerprint
from memories_ingest.sandbox import Sandbox
from memories_ingest.uploader import (
    Client,
    Evidence,
    FileChanged,
    ListFailed,
    SnapshotReader,
)

from conftest import API_KEY, RawServer, read_request_head, wait_until


def test_the_reader_returns_big_blocks_and_detects_a_change(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = SnapshotReader(fd, os.fstat(fd), str(path), threading.Event())
        first = reader.read(8192)
        assert len(first) == 1024 * 1024
        with path.open("ab") as grow:
            grow.write(b"more")
        reader.read(8192)
        reader.read(8192)
        with pytest.raises(FileChanged, match="modified"):
            reader.read(8192)
    finally:
        os.close(fd)


def test_the_reader_detects_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = SnapshotReader(fd, os.fstat(fd), str(path), threading.Event())
        replacement = tmp_path / "new.mp4"
        replacement.write_bytes(b"y" * 100)
        replacement.replace(path)
        with pytest.raises(FileChanged, match="replaced"):
            reader.read()
    finally:
        os.close(fd)


def test_fingerprint_changes_with_content_and_not_with_mtime(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    path.write_bytes(os.urandom(3 << 20))
    fd = os.open(path, os.O_RDONLY)
    first = fingerprint(fd, os.fstat(fd).st_size)
    os.close(fd)
    os.utime(path, (1, 1))
    fd = os.open(path, os.O_RDONLY)
    assert fingerprint(fd, os.fstat(fd).st_size) == first
    os.close(fd)
    with path.open("r+b") as handle:
        handle.seek(-10, os.SEEK_END)
        handle.write(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    assert fingerprint(fd, os.fstat(fd).st_size) != first
    os.close(fd)


def small_video(tmp_path: Path, size: int = 4096) -> tuple[SnapshotReader, int]:
    path = tmp_path / "v.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(size - 12))
    fd = os.open(path, os.O_RDONLY)
    return SnapshotReader(fd, os.fstat(fd), str(path), threading.Event()), fd


def send(client: Client, tmp_path: Path, size: int = 4096) -> Outcome:
    reader, fd = small_video(tmp_path, size)
    try:
        return client.upload(reader, "v.mp4", "video/mp4", [("unique_id", "u")])
    finally:
        os.close(fd)
        client.close()


def test_a_refused_connection_is_transient(tmp_path: Path) -> None:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    result = send(Client(f"http://127.0.0.1:{port}", API_KEY, connect_timeout=2), tmp_path)
    assert result.kind == "transient" and "connection failed" in result.message
    assert API_KEY not in result.message


def test_a_name_that_does_not_resolve_is_transient(tmp_path: Path) -> None:
    result = send(Client("http://memories-ingest-test.invalid", API_KEY, connect_timeout=2), tmp_path)
    assert result.kind == "transient"


def test_a_reset_mid_body_is_transient(tmp_path: Path, sandbox: Sandbox) -> None:
    sandbox.inject("reset", after_bytes=1000)
    result = send(Client(sandbox.url, API_KEY), tmp_path, size=1 << 20)
    assert result.kind == "transient"
    assert sandbox.received() == []


def test_a_server_that_never_answers_times_out(tmp_path: Path, sandbox: Sandbox) -> None:
    sandbox.inject("slow", seconds=5)
    result = send(Client(sandbox.url, API_KEY, read_timeout=0.5), tmp_path)
    assert result.kind == "transient" and "timed out" in result.message


def test_a_stalled_upload_is_given_up_at_the_minimum_throughput(tmp_path: Path) -> None:
    stalled = threading.Event()

    def never_read(connection: socket.socket) -> None:
        stalled.wait(30)

    server = RawServer(never_read, receive_buffer=4096)
    try:
        client = Client(server.url, API_KEY, connect_timeout=0.5, min_bytes_per_second=2 * 1024 * 1024)
        result = send(client, tmp_path, size=64 << 20)
    finally:
        stalled.set()
        server.close()
    assert result.kind == "transient" and "timed out" in result.message


def test_redirects_are_not_followed_and_never_carry_the_key(tmp_path: Path) -> None:
    seen_keys: list[bytes] = []

    def elsewhere(connection: socket.socket) -> None:
        seen_keys.append(read_request_head(connection))
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    target = RawServer(elsewhere)

    def redirect(connection: socket.socket) -> None:
        read_request_head(connection)
        location = f"{target.url}/serve/api/v1/upload".encode()
        connection.sendall(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " + location + b"\r\nContent-Length: 0\r\n\r\n"
        )

    origin = RawServer(redirect)
    try:
        result = send(Client(origin.url, API_KEY), tmp_path)
    finally:
        origin.close()
        target.close()
    assert result.kind == "transient" and "redirect" in result.message and "not followed" in result.message
    assert seen_keys == []


def send_tagged(sandbox: Sandbox, tmp_path: Path, size: int, tag: str, unique_id: str = "u") -> Outcome:
    reader, fd = small_video(tmp_path, size)
    client = Client(sandbox.url, API_KEY)
    try:
        return client.upload(reader, "v.mp4", "video/mp4", [("unique_id", unique_id), ("tags", tag)])
    finally:
        os.close(fd)
        client.close()


def find(sandbox: Sandbox, **query: Any) -> Evidence:
    client = Client(sandbox.url, API_KEY)
    try:
        arguments: dict[str, Any] = {"unique_id": "u", "tag": "mi-mine", "size": 5000, "stem": "v", "known": set()}
        return client.find_upload(**{**arguments, "sent_at": time.time() - 5, **query})
    finally:
        client.close()


def test_find_upload_proves_a_landing_only_by_the_files_identity_tag(tmp_path: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=100, list_rate_per_second=100, parse_seconds=0.5) as sandbox:
        mine = send_tagged(sandbox, tmp_path, 5000, "mi-mine")
        theirs = send_tagged(sandbox, tmp_path, 5000, "mi-theirs")
        before_parsing = find(sandbox)
        assert before_parsing.landed is None and len(before_parsing.unproven) == 2, "same size, no tags yet"
        assert find(sandbox, known={mine.video_no, theirs.video_no}).unproven == ()
        wait_until(lambda: sandbox.video_status(mine.video_no or "") == "PARSE", what="parsing")
        wait_until(lambda: sandbox.video_status(theirs.video_no or "") == "PARSE", what="parsing")
        parsed = find(sandbox)
        assert parsed.landed is not None and parsed.landed.video_no == mine.video_no
        assert find(sandbox, tag="mi-nobodys").landed is None
        assert find(sandbox, tag="mi-nobodys").unproven == (), "parsed videos with other tags are not candidates"
        assert find(sandbox, unique_id="other").landed is None


def test_find_upload_counts_the_copies_of_a_file_that_went_up_twice(tmp_path: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=100, list_rate_per_second=100, parse_seconds=0.1) as sandbox:
        first = send_tagged(sandbox, tmp_path, 5000, "mi-mine")
        send_tagged(sandbox, tmp_path, 5000, "mi-mine")
        wait_until(lambda: find(sandbox).landed is not None, what="parsing")
        evidence = find(sandbox)
    assert evidence.landed is not None and evidence.landed.video_no == first.video_no
    assert evidence.copies == 2


def test_find_upload_failing_to_list_raises(tmp_path: Path, sandbox: Sandbox) -> None:
    client = Client(sandbox.url, "wrong-key")
    try:
        with pytest.raises(ListFailed):
            client.find_upload(unique_id="u", tag="mi-x", size=1, stem="v", sent_at=time.time(), known=set())
    finally:
        client.close()
