"""Indexing results: what memories.ai says about each upload once it has parsed it.

list_videos is the truth. The indexer asks it about the uploads still waiting, by their videoNos (`video_nos`, up
to 100 a call) in each upload's own scope: every poll_seconds, and at once when a callback names one of them. A
callback is only a hint: anyone who can reach the listener could send one, so it never changes a row by itself.
The listener takes callbacks only on a secret path (indexing.public_url plus a token the ledger keeps), and
gives each connection a few seconds at most.

PARSE makes a row `indexed`; PARSE_ERROR, FAILED or FAIL make it `index_failed`, with the cause as its error.
Only `uploaded` and `index_failed` rows change, so a result never takes a row back from a later state.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler
from typing import Any

import structlog

from . import api
from .ledger import Ledger, LedgerError, Row
from .uploader import Client, ListedVideo, ListFailed
from .worker import Worker

log = structlog.get_logger()

REPORTED_FAILED = "memories.ai reported that parsing failed, and gave no cause"
MAX_BODY_BYTES = 16 * 1024
MAX_CAUSE_CHARS = 1000
# A connection gets this long, all told, to send its request: an idle or trickling one cannot hold a slot.
CONNECTION_SECONDS = 5.0
MAX_CONNECTIONS = 32
ACCEPT_WAIT_SECONDS = 0.5
# How often the indexer looks for hints when it has nothing to poll.
IDLE_SECONDS = 1.0
TOKEN_KEY = "callback_token"


def callback_token(ledger: Ledger) -> str:
    """The secret last segment of the callback URL: made once, then kept in the ledger."""

    def keep_or_make(found: Any) -> tuple[Any, str]:
        token = found if isinstance(found, str) and found else secrets.token_urlsafe(24)
        return token, token

    token: str = ledger.update_setting(TOKEN_KEY, keep_or_make)
    return token


def callback_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/{token}"


class Indexer(Worker):
    """Asks list_videos what became of uploads: all that wait, every poll_seconds; those a callback named, at once."""

    name = "indexer"

    def __init__(
        self,
        *,
        stop: threading.Event,
        ledger: Ledger,
        client: Client,
        poll_seconds: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(stop)
        self.ledger = ledger
        self.client = client
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.next_poll = clock() if poll_seconds else float("inf")
        self.hinted: set[str] = set()
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._statuses_seen: set[tuple[str, str]] = set()

    @property
    def quiet_seconds(self) -> float:
        """One list_videos call and its wait for a turn: each call is a sign of life, however many a poll makes."""
        return IDLE_SECONDS + 1 / self.client.list_limiter.rate + sum(self.client.timeout)

    def hint(self, video_no: str) -> None:
        """A callback named this video: ask list_videos about it soon. Safe from any thread."""
        with self._lock:
            self.hinted.add(video_no)
        self.wake.set()

    def loop(self) -> None:
        self.wake.clear()
        if self.clock() >= self.next_poll:
            assert self.poll_seconds is not None
            self.next_poll = self.clock() + self.poll_seconds
            self.poll()
        with self._lock:
            hinted, self.hinted = self.hinted, set()
        if hinted:
            self.ask(self.ledger.awaiting_index(video_nos=hinted))
        self.wake.wait(min(IDLE_SECONDS, max(0.0, self.next_poll - self.clock())))

    def poll(self) -> int:
        """Ask about every upload still waiting for a result; returns how many rows changed."""
        return self.ask(self.ledger.awaiting_index())

    def ask(self, rows: Iterable[Row]) -> int:
        """Ask list_videos about these rows' videos, by videoNo, scope by scope; returns how many rows changed."""
        scopes: dict[str | None, list[str]] = {}
        for row in rows:
            assert row.video_no is not None
            numbers = scopes.setdefault(row.unique_id, [])
            if row.video_no not in numbers:
                numbers.append(row.video_no)
        changed = 0
        for unique_id, numbers in scopes.items():
            for start in range(0, len(numbers), api.MAX_VIDEO_NOS):
                if self.stop.is_set():
                    return changed
                wanted = numbers[start : start + api.MAX_VIDEO_NOS]
                self.heartbeat = time.monotonic()
                try:
                    listed = self.client.list_videos(unique_id=unique_id, video_nos=wanted, size=len(wanted))
                except ListFailed as error:
                    log.warning("cannot ask list_videos for indexing results; asking again later", reason=str(error))
                    return changed
                changed += sum(self.record(video) for video in listed if video.video_no in wanted)
        return changed

    def record(self, video: ListedVideo) -> int:
        """Store what list_videos says about one video; returns how many rows changed."""
        result = api.indexing_result(video.status, video.cause)
        if result is None:
            status = str(video.status)
            if status != api.NOT_PARSED and (video.video_no, status) not in self._statuses_seen:
                self._statuses_seen.add((video.video_no, status))
                log.warning("list_videos gave a status this daemon does not know; still waiting", status=status)
            return 0
        state, cause = result
        failure = None if state == "indexed" else (cause or REPORTED_FAILED)[:MAX_CAUSE_CHARS]
        changed = self.ledger.mark_indexed(video.video_no, failure)
        for row in changed:
            context = {"path": str(row.path), "unique_id": row.unique_id, "state": row.state}
            if failure is None:
                log.info("indexed", video_no=video.video_no, **context)
            else:
                log.warning("indexing failed", video_no=video.video_no, cause=failure, **context)
        return len(changed)


class ListenFailed(Exception):
    """The callback listener cannot take its address; the message says which and why."""


class CallbackListener(Worker):
    """Where memories.ai POSTs each video's status: a hint for the indexer, taken only on the secret path.

    Every well-formed callback on that path is answered 200, ours or not: a sender told no may retry forever,
    and the answer tells a stranger nothing about which videoNos are ours. Any other path gets 404, a malformed
    callback 400, one over 16 KiB 413.
    """

    name = "callbacks"

    def __init__(self, *, stop: threading.Event, ledger: Ledger, indexer: Indexer, listen: str, token: str) -> None:
        super().__init__(stop)
        self.ledger = ledger
        self.indexer = indexer
        self.token = token
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        server = _Server6 if ":" in host else _Server
        try:
            self.server = server((host, int(port)), self)
        except OSError as error:
            raise ListenFailed(f"cannot listen for callbacks on {listen}: {error.strerror or error}") from None
        log.info("listening for indexing callbacks", url=self.url)

    @property
    def quiet_seconds(self) -> float:
        """Between two requests, one wait for a connection."""
        return ACCEPT_WAIT_SECONDS

    @property
    def url(self) -> str:
        """Where the listener is, without the token."""
        host, port = self.server.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def loop(self) -> None:
        self.server.handle_request()

    def shutdown(self) -> None:
        self.server.server_close()

    def on_secret_path(self, path: str) -> bool:
        """Whether a request's path ends in the token; a proxy in front may put anything before it."""
        last = urllib.parse.urlsplit(path).path.rstrip("/").rpartition("/")[2]
        return hmac.compare_digest(last.encode(), self.token.encode())

    def receive(self, video_no: str) -> None:
        """One well-formed callback: a hint, when it names one of our uploads still waiting for its result."""
        if self.ledger.awaiting_index(video_nos=[video_no]):
            self.indexer.hint(video_no)
        else:
            log.debug("a callback for a video that is not ours, or not waiting", video_no=video_no)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _CallbackHandler(BaseHTTPRequestHandler):
    server: _Server
    timeout = CONNECTION_SECONDS
    server_version = "memories-ingest"
    sys_version = ""

    def do_POST(self) -> None:
        listener = self.server.listener
        if not listener.on_secret_path(self.path):
            self._answer(404, {"error": "not found"})
            return
        try:
            video_no = self._callback()
        except _Refused as refusal:
            self._answer(refusal.status, {"error": str(refusal)})
            return
        try:
            listener.receive(video_no)
        except LedgerError:
            self._answer(503, {"error": "the ledger cannot be read"})
            return
        self._answer(200, {"ok": True})

    def _callback(self) -> str:
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
        return video_no

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
    """One thread per connection, at most MAX_CONNECTIONS at once, each cut off after CONNECTION_SECONDS."""

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
        # A per-read timeout alone lets a client that sends a byte every few seconds keep its slot for ever.
        deadline = threading.Timer(CONNECTION_SECONDS, _cut_off, args=(request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("a callback connection failed", client=client_address[0], error=str(error))
        else:
            log.exception("handling a callback failed", client=client_address[0])


def _cut_off(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


class _Server6(_Server):
    address_family = socket.AF_INET6
