"""Indexing results: what memories.ai says about each upload once it has parsed it.

Two sources, either or both: a listener for the callback memories.ai POSTs (`{"videoNo", "status"}`) to the
upload's `callback` URL, and a poller that asks list_videos about uploads still waiting. PARSE makes a row
`indexed`; FAILED makes it `index_failed`, with the cause as its error. Only `uploaded` and `index_failed` rows
change, so neither source can take a row back from a later state.
"""

from __future__ import annotations

import json
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

import structlog

from .ledger import Ledger, LedgerError
from .uploader import Client, ListFailed
from .worker import Worker

log = structlog.get_logger()

PARSE = "PARSE"
FAILED = "FAILED"
REPORTED_FAILED = "memories.ai reported FAILED and gave no cause"
PAGE_SIZE = 100
# A poll reads at most this many pages per scope (at 4 per second): an upload that memories.ai no longer lists
# would otherwise have every poll read the scope back to the day it was sent.
MAX_PAGES = 20
# The server's clock is not ours: a page only counts as older than an upload past this margin.
CLOCK_SLACK_SECONDS = 600.0
MAX_BODY_BYTES = 16 * 1024
MAX_CAUSE_CHARS = 1000
REQUEST_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 32
ACCEPT_WAIT_SECONDS = 0.5


def record_result(ledger: Ledger, video_no: str, status: str | None, cause: str | None) -> bool:
    """Store what memories.ai says about a video; True when a row changed. Any other status says nothing yet."""
    if status == PARSE:
        changed = ledger.mark_indexed(video_no)
    elif status == FAILED:
        changed = ledger.mark_indexed(video_no, cause or REPORTED_FAILED)
    else:
        return False
    if changed and status == PARSE:
        log.info("indexed", video_no=video_no, state="indexed")
    elif changed:
        log.warning("indexing failed", video_no=video_no, state="index_failed", cause=cause or REPORTED_FAILED)
    return changed


def find_video(client: Client, video_no: str) -> tuple[str | None, str | None] | None:
    """One video's status and cause, from list_videos filtered by its number; None when it is not listed."""
    for video in client.list_videos(unique_id=None, size=1, video_no=video_no):
        if video.video_no == video_no:
            return (str(video.status) if video.status else None, str(video.cause) if video.cause else None)
    return None


class Indexer(Worker):
    """Every poll_seconds, asks list_videos what became of the uploads still waiting for a result."""

    name = "indexer"

    def __init__(self, stop: threading.Event, ledger: Ledger, client: Client, poll_seconds: float) -> None:
        super().__init__(stop)
        self.ledger = ledger
        self.client = client
        self.poll_seconds = poll_seconds

    def loop(self) -> None:
        self.poll()
        self.stop.wait(self.poll_seconds)

    def poll(self) -> int:
        """One round over every scope with uploads waiting; returns how many rows changed."""
        waiting: dict[str | None, dict[str, float]] = {}
        for row in self.ledger.awaiting_index():
            assert row.video_no is not None
            waiting.setdefault(row.unique_id, {})[row.video_no] = row.uploaded_at or 0.0
        return sum(self.poll_scope(unique_id, videos) for unique_id, videos in waiting.items())

    def poll_scope(self, unique_id: str | None, videos: dict[str, float]) -> int:
        """Pages through a scope's videos, newest first, until every waiting one is found or the pages are older."""
        horizon = min(videos.values()) - CLOCK_SLACK_SECONDS
        changed = 0
        for page in range(1, MAX_PAGES + 1):
            if self.stop.is_set():
                break
            try:
                listed = self.client.list_videos(unique_id=unique_id, page=page, size=PAGE_SIZE)
            except ListFailed as error:
                log.warning(
                    "cannot ask list_videos for indexing results; asking again at the next poll", reason=str(error)
                )
                break
            for video in listed:
                if videos.pop(video.video_no, None) is not None:
                    changed += record_result(self.ledger, video.video_no, video.status, video.cause)
            older = any(video.created_at is not None and video.created_at < horizon for video in listed)
            if not videos or len(listed) < PAGE_SIZE or older:
                break
        return changed


class ListenFailed(Exception):
    """The callback listener cannot take its address; the message says which and why."""


class CallbackListener(Worker):
    """Where memories.ai POSTs each video's status: records indexed and index_failed for videos in the ledger.

    Every well-formed callback is answered 200, ours or not: a sender told no may retry forever, and the answer
    tells a stranger nothing about which videoNos are ours. A malformed one gets 400, one over 16 KiB 413, and
    one that cannot be recorded because the ledger cannot be written 503. Any path is accepted, since a proxy
    in front may rewrite it. A FAILED without a cause is recorded at once; list_videos is then asked for the
    cause (which also corrects a callback that was not true).
    """

    name = "callbacks"

    def __init__(self, stop: threading.Event, ledger: Ledger, client: Client, listen: str) -> None:
        super().__init__(stop)
        self.ledger = ledger
        self.client = client
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        server = _Server6 if ":" in host else _Server
        try:
            self.server = server((host, int(port)), self)
        except OSError as error:
            raise ListenFailed(f"cannot listen for callbacks on {listen}: {error.strerror or error}") from None
        log.info("listening for indexing callbacks", url=self.url)

    @property
    def url(self) -> str:
        host, port = self.server.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def loop(self) -> None:
        self.server.handle_request()

    def shutdown(self) -> None:
        self.server.server_close()

    def receive(self, video_no: str, status: str, cause: str | None) -> bool:
        """Record one callback; True when list_videos should then be asked why the video failed."""
        changed = record_result(self.ledger, video_no, status, cause)
        if not changed:
            log.debug("a callback changed nothing (not ours, known already, or no result)", video_no=video_no)
        return changed and status == FAILED and not cause

    def look_up_cause(self, video_no: str) -> None:
        try:
            found = find_video(self.client, video_no)
        except ListFailed as error:
            log.warning("cannot ask list_videos why indexing failed", video_no=video_no, reason=str(error))
            return
        if found is None or found[0] not in (PARSE, FAILED):
            log.warning("a FAILED callback that list_videos does not confirm", video_no=video_no, listed=found)
            return
        try:
            record_result(self.ledger, video_no, *found)
        except LedgerError as error:
            self.fail(error)

    def fail(self, error: LedgerError) -> None:
        """The ledger cannot be written: stop the daemon, as a worker does."""
        self.fatal = error
        self.stop.set()


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _CallbackHandler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_SECONDS
    server_version = "memories-ingest"
    sys_version = ""

    def do_POST(self) -> None:
        listener = self.server.listener
        try:
            video_no, status, cause = self._callback()
        except _Refused as refusal:
            self._answer(refusal.status, {"error": str(refusal)})
            return
        try:
            look_up = listener.receive(video_no, status, cause)
        except LedgerError as error:
            listener.fail(error)
            self._answer(503, {"error": "the ledger cannot be written"})
            return
        self._answer(200, {"ok": True})
        # After the answer, so the sender never waits on list_videos.
        if look_up:
            listener.look_up_cause(video_no)

    def _callback(self) -> tuple[str, str, str | None]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _Refused(411, "send the body with a Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _Refused(411, "a Content-Length is required") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise _Refused(413 if length > 0 else 400, f"the body must be at most {MAX_BODY_BYTES} bytes")
        try:
            body = self.rfile.read(length)
        except OSError:
            raise _Refused(408, "the body did not arrive in time") from None
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            raise _Refused(400, "the body must be JSON") from None
        if not isinstance(payload, dict):
            raise _Refused(400, "the body must be a JSON object")
        # The callback says videoNo; list_videos says video_no. Either is taken.
        video_no = payload.get("videoNo", payload.get("video_no"))
        status, cause = payload.get("status"), payload.get("cause")
        if not isinstance(video_no, str) or not 0 < len(video_no) <= 200:
            raise _Refused(400, "videoNo must be a string")
        if not isinstance(status, str):
            raise _Refused(400, "status must be a string")
        if cause is not None and not isinstance(cause, str):
            raise _Refused(400, "cause must be a string")
        return video_no, status, cause[:MAX_CAUSE_CHARS] if cause else None

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("callback request", client=self.client_address[0], line=format % args)


class _Server(socketserver.ThreadingTCPServer):
    """One thread per connection, at most MAX_CONNECTIONS at once, so a flood cannot grow the thread count."""

    daemon_threads = True
    allow_reuse_address = True
    timeout = ACCEPT_WAIT_SECONDS

    def __init__(self, address: tuple[str, int], listener: CallbackListener) -> None:
        self.listener = listener
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _CallbackHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("a callback connection failed", client=client_address[0], error=str(error))
        else:
            log.exception("handling a callback failed", client=client_address[0])


class _Server6(_Server):
    address_family = socket.AF_INET6
