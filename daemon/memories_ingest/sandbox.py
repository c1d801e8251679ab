"""A stand-in for the memories.ai API, served over loopback for the tests, the demo and anyone trying the daemon.

It answers as the vendor documents: in v1.2's string codes on HTTP 200 by default, or in the newer API's integer
codes equal to the HTTP status, with the vendor's own texts (see :mod:`memories_ingest.api`). Where the vendor
documents no code (the indexing cap, a server error, an unknown path), the sandbox uses codes of its own that
begin with S in v1.2, and says so. It enforces every documented upload rule and a per-account upload rate, which
can be far slower than 1 per second, and it can inject what a real network and a real vendor do to a client
(rate limits, 5xx answers, resets, stalls, trickling reads, duplicate refusals), so that the daemon's handling of
each is exercised over real HTTP.

Like the real API, it names each stored video itself (a hex string unrelated to the file name), files an upload
without a unique_id under the scope ``default``, lists a video's tags only once it is parsed, and spells a failed
parse PARSE_ERROR.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import http
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, cast

import requests
import structlog
from structlog.typing import FilteringBoundLogger
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
from werkzeug.formparser import MultiPartParser
from werkzeug.http import parse_options_header
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Response
from werkzeug.wsgi import get_content_length, get_input_stream

from . import api
from .files import IDENTITY_TAG_PREFIX

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

UPLOAD_PATH = api.UPLOAD_PATH
LIST_PATH = api.LIST_PATH
MAX_FILE_BYTES = api.MAX_FILE_BYTES

ACCOUNT_STATES = ("ok", "bad_key", "insufficient_balance", "disabled", "permission_denied", "indexing_cap")
FAULT_PARAMS: dict[str, frozenset[str]] = {
    "rate_limit": frozenset({"http_status", "retry_after"}),
    "server_error": frozenset({"status", "html"}),
    "reset": frozenset({"after_bytes"}),
    "slow": frozenset({"seconds", "accept"}),
    "trickle": frozenset({"bytes_per_second"}),
    "invalid_field": frozenset({"msg"}),
    # Any answer of the table below by name; landed: the video is stored although the answer refuses it.
    "answer": frozenset({"name", "landed"}),
    **{state: frozenset() for state in ACCOUNT_STATES if state != "ok"},
}
VIDEO_NAMES = ("internal", "stem")

_READ_SIZE = 1024 * 1024
# Text fields are buffered by the parser, so they get a cap; the file part is streamed. werkzeug also
# applies the cap to each read plus its leftover buffer, so it must stay well above _READ_SIZE.
_MAX_FIELD_BYTES = 4 * _READ_SIZE
_MAX_FORM_PARTS = 1000
_MAX_LIST_BODY_BYTES = 64 * 1024
_CALLBACK_TIMEOUT_SECONDS = 5.0
_DATETIME_TAKEN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")
# The server appends this tag to every upload.
API_TAG = "api"

_log = structlog.get_logger(__name__)
_Headers = tuple[tuple[str, str], ...]
_Fields = dict[str, list[str]]


@dataclass(frozen=True)
class _Code:
    """How the sandbox answers one outcome: v1.2 code (on HTTP v1_status), newer-API code (also the status), text."""

    v1: str
    v2: int
    text: str
    v1_status: int = 200
    # The newer API's codes are HTTP statuses; only the sandbox's own need another.
    v2_status: int | None = None


def _documented(name: str, *, v1: str | None = None, v2: int | None = None) -> _Code:
    meaning = api.BY_NAME[name]
    return _Code(meaning.v1_code or v1 or "", meaning.v2_code or v2 or 0, meaning.vendor_text)


# Every documented answer, with stand-ins where one dialect has no code of its own for it.
_CODES = {
    "success": _documented("success"),
    "parameters": _documented("parameters", v2=400),
    "invalid": _documented("invalid"),
    "media": _documented("media", v1="0003"),
    "bad_key": _documented("bad_key"),
    "insufficient_balance": _documented("insufficient_balance"),
    "disabled": _documented("disabled"),
    "duplicate": _documented("duplicate"),
    "rate_limited": _documented("rate_limited"),
    "permission_denied": _documented("permission_denied", v2=403),
    # The sandbox's own: the vendor documents no code for these.
    "indexing_cap": _Code("S001", 4001, "The number of videos being indexed has reached the limit", v2_status=400),
    "server_error": _Code("S500", 500, "Internal server error", v1_status=500),
    "not_found": _Code("S404", 404, "No such endpoint", v1_status=404),
    "method": _Code("S405", 405, "Method not allowed", v1_status=405),
}
ANSWER_NAMES = tuple(_CODES)


@dataclass(frozen=True)
class ReceivedVideo:
    video_no: str
    video_name: str
    filename: str
    content_type: str
    size: int
    sha256: str
    fields: dict[str, list[str]]
    received_at: float

    @property
    def unique_id(self) -> str | None:
        values = self.fields.get("unique_id")
        return values[0] if values else None

    @property
    def scope(self) -> str:
        return self.unique_id or api.DEFAULT_SCOPE

    @property
    def tags(self) -> list[str]:
        return list(self.fields.get("tags", []))

    @property
    def folder_tags(self) -> list[str]:
        """The tags without the identity tag the daemon adds to every upload."""
        return [tag for tag in self.tags if not tag.startswith(IDENTITY_TAG_PREFIX)]


@dataclass(frozen=True)
class RequestRecord:
    arrived_at: float
    path: str
    # 0 when the connection ended without an answer (a reset fault, or the client went away).
    http_status: int
    code: str | None


@dataclass(frozen=True)
class _Fault:
    name: str
    params: dict[str, Any]


@dataclass
class _StoredVideo:
    video: ReceivedVideo
    status: str = api.NOT_PARSED
    cause: str | None = None


@dataclass(frozen=True)
class _Answer:
    http_status: int
    code: str | None
    body: bytes
    content_type: str = "application/json"
    headers: _Headers = ()
    file: _FilePart | None = None
    stall_seconds: float = 0.0


class _SlidingWindow:
    """At most `count` arrivals in any window of `seconds`; rejected arrivals count too, as they do upstream."""

    def __init__(self, per_second: float) -> None:
        self.count = max(1, int(per_second))
        self.seconds = self.count / per_second
        self._arrivals: collections.deque[float] = collections.deque()

    def admit(self, now: float) -> bool:
        while self._arrivals and self._arrivals[0] <= now - self.seconds:
            self._arrivals.popleft()
        admitted = len(self._arrivals) < self.count
        self._arrivals.append(now)
        return admitted


class _AbortConnection(BaseException):
    """Ends the connection without an answer (a BaseException: werkzeug answers 500 to an Exception)."""


class _InvalidUpload(Exception):
    pass


class _FilePart:
    """Takes the place of the parser's temporary file: the part is hashed and counted, then dropped."""

    def __init__(self, filename: str | None, content_type: str | None) -> None:
        self.filename = filename or ""
        self.content_type = content_type or ""
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        self.size += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def _sink_factory(
    total_content_length: int | None,
    content_type: str | None,
    filename: str | None,
    content_length: int | None = None,
) -> IO[bytes]:
    return cast(IO[bytes], _FilePart(filename, content_type))


def _request_handler(connections: set[socket.socket], lock: threading.Lock) -> type[WSGIRequestHandler]:
    class SandboxRequestHandler(WSGIRequestHandler):
        def setup(self) -> None:
            super().setup()
            with lock:
                connections.add(self.connection)

        def finish(self) -> None:
            with lock:
                connections.discard(self.connection)
            super().finish()

        def run_wsgi(self) -> None:
            try:
                super().run_wsgi()
            except _AbortConnection:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    # A zero linger makes close() send RST rather than FIN, as a dropped proxy does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # The buffered reader holds a reference that would keep the socket open past close().
                self.rfile.close()
                self.connection.close()

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            """Silenced: the sandbox writes its own, richer line per request."""

    return SandboxRequestHandler


def _drain(stream: IO[bytes], limit: float = math.inf) -> None:
    remaining = limit
    while remaining > 0 and (chunk := stream.read(int(min(_READ_SIZE, remaining)))):
        remaining -= len(chunk)


def _read_at_most(stream: IO[bytes], limit: int) -> bytes:
    data = bytearray()
    while len(data) < limit and (chunk := stream.read(limit - len(data))):
        data += chunk
    return bytes(data)


def _parse_form(environ: WSGIEnvironment, stream: IO[bytes]) -> tuple[_Fields, dict[str, list[_FilePart]]]:
    mimetype, options = parse_options_header(environ.get("CONTENT_TYPE"))
    if mimetype != "multipart/form-data":
        raise _InvalidUpload("the request must be multipart/form-data")
    boundary = options.get("boundary", "")
    if not boundary:
        raise _InvalidUpload("the multipart/form-data boundary is missing")
    parser = MultiPartParser(
        stream_factory=_sink_factory,
        max_form_memory_size=_MAX_FIELD_BYTES,
        buffer_size=_READ_SIZE,
        max_form_parts=_MAX_FORM_PARTS,
    )
    try:
        form, files = parser.parse(stream, boundary.encode("latin-1"), get_content_length(environ))
    except ValueError as error:
        raise _InvalidUpload(f"malformed multipart body: {error}") from error
    except RequestEntityTooLarge as error:
        raise _InvalidUpload(
            f"a form field exceeds {_MAX_FIELD_BYTES} bytes or the form has over {_MAX_FORM_PARTS} parts"
        ) from error
    # Every file part's stream is the _FilePart that _sink_factory made for it.
    parts = {name: [cast(_FilePart, storage.stream) for storage in files.getlist(name)] for name in files}
    return form.to_dict(flat=False), parts


def _is_datetime_taken(value: str) -> bool:
    try:
        return bool(_DATETIME_TAKEN.fullmatch(value)) and bool(datetime.strptime(value, "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        return False


def _is_decimal_within(value: str, bound: float) -> bool:
    return bool(_DECIMAL.fullmatch(value)) and -bound <= float(value) <= bound


def _is_boolean(value: str) -> bool:
    return value.lower() in {"true", "false", "1", "0"}


_FIELD_RULES: dict[str, tuple[Callable[[str], bool], str]] = {
    "unique_id": (lambda value: bool(value.strip()), "unique_id must not be empty"),
    "datetime_taken": (_is_datetime_taken, "datetime_taken must be yyyy-MM-dd HH:mm:ss"),
    "latitude": (partial(_is_decimal_within, bound=90), "latitude must be a decimal number in [-90, 90]"),
    "longitude": (
        partial(_is_decimal_within, bound=180),
        "longitude must be a decimal number in [-180, 180]",
    ),
    "camera_model": (
        lambda value: len(value) <= api.MAX_CAMERA_MODEL,
        f"camera_model must be at most {api.MAX_CAMERA_MODEL} characters",
    ),
    "callback": (
        lambda value: len(value) <= api.MAX_CALLBACK,
        f"callback must be at most {api.MAX_CALLBACK} characters",
    ),
    "retain_original_video": (_is_boolean, "retain_original_video must be true or false"),
}


def _upload_problem(fields: _Fields, files: dict[str, list[_FilePart]], max_file_bytes: int) -> tuple[str, str] | None:
    """What is wrong with an upload, if anything: the answer's name ("invalid" or "media") and the detail."""
    if "file" in fields:
        return "invalid", "file must be sent as a file part, with a filename"
    strays = sorted(set(files) - {"file"})
    if strays:
        return "invalid", f"unexpected file part(s) {', '.join(strays)}: only 'file' may carry a file"
    parts = files.get("file", [])
    if not parts:
        return "invalid", "file is required"
    if len(parts) > 1:
        return "invalid", "exactly one file part is allowed"
    part = parts[0]
    if os.path.splitext(part.filename)[1].lower() not in api.VIDEO_EXTENSIONS:
        return "media", f"file extension must be one of {', '.join(api.VIDEO_EXTENSIONS)} (got {part.filename!r})"
    if not part.content_type.lower().startswith("video/"):
        return "media", f"file Content-Type must start with video/ (got {part.content_type!r})"
    if part.size == 0:
        return "invalid", "file must not be empty"
    if part.size > max_file_bytes:
        return "invalid", f"file must be at most {max_file_bytes} bytes (got {part.size})"
    if len(fields.get("tags", [])) > api.MAX_TAGS:
        return "invalid", f"at most {api.MAX_TAGS} tags are allowed"
    for name, (is_valid, problem) in _FIELD_RULES.items():
        if not all(is_valid(value) for value in fields.get(name, [])):
            return "invalid", problem
    return None


def _positive_int(value: Any) -> int | None:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _request_logger() -> FilteringBoundLogger:
    logger: FilteringBoundLogger
    if structlog.is_configured():
        logger = structlog.get_logger(__name__)
    else:
        # Unconfigured structlog prints to stdout, and the sandbox command's log belongs on stderr.
        logger = structlog.wrap_logger(structlog.PrintLogger(sys.stderr))
    return logger


class _Trickle:
    """A request body read at no more than `bytes_per_second`: a slow uplink, as the server sees it."""

    def __init__(self, stream: IO[bytes], bytes_per_second: float, stopping: threading.Event) -> None:
        self._stream = stream
        self._rate = bytes_per_second
        self._stopping = stopping
        self._started = time.monotonic()
        self._read = 0

    def read(self, size: int = -1) -> bytes:
        chunk = max(1, int(self._rate / 10))
        data = self._stream.read(chunk if size < 0 else min(size, chunk))
        self._read += len(data)
        self._stopping.wait(max(0.0, self._started + self._read / self._rate - time.monotonic()))
        return data


class Sandbox:
    """The memories.ai upload and list endpoints on a local port, with injectable faults."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        dialect: str = api.V1,
        rate_per_second: float = 1.0,
        list_rate_per_second: float = api.LIST_RATE_PER_SECOND,
        parse_seconds: float = 0.5,
        max_file_bytes: int = MAX_FILE_BYTES,
        video_names: str = "internal",
        failure_status: str = "PARSE_ERROR",
        log_requests: bool = False,
    ) -> None:
        if dialect not in api.DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; known: {', '.join(api.DIALECTS)}")
        if video_names not in VIDEO_NAMES:
            raise ValueError(f"video_names is one of {', '.join(VIDEO_NAMES)}")
        if failure_status not in api.PARSE_FAILURES:
            raise ValueError(f"failure_status is one of {', '.join(sorted(api.PARSE_FAILURES))}")
        self._host = host
        self._port = port
        self._api_key = api_key
        self.dialect = dialect
        self._parse_seconds = parse_seconds
        self._max_file_bytes = max_file_bytes
        self._video_names = video_names
        self._failure_status = failure_status
        self._request_log = _request_logger() if log_requests else None
        self._lock = threading.Lock()
        self._upload_window = _SlidingWindow(rate_per_second)
        self._list_window = _SlidingWindow(list_rate_per_second)
        self._faults: collections.deque[_Fault] = collections.deque()
        self._account = "ok"
        self._parse_failures: collections.deque[str] = collections.deque()
        self._videos: dict[str, _StoredVideo] = {}
        self._requests: list[RequestRecord] = []
        self._list_queries: list[dict[str, Any]] = []
        self._parse_timers: dict[str, threading.Timer] = {}
        # Random start, so numbers from a restarted sandbox do not collide with earlier ones.
        self._video_numbers = itertools.count(random.randrange(10**17, 9 * 10**17))
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Sandbox:
        if self._server is not None:
            raise RuntimeError("the sandbox is already running")
        self._stopping.clear()
        handler = _request_handler(self._connections, self._connections_lock)
        self._server = make_server(self._host, self._port, self._wsgi_app, threaded=True, request_handler=handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="sandbox", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        thread.join()
        # Uploads still in flight see the server go away, as they would if it crashed.
        with self._connections_lock:
            open_connections = list(self._connections)
        for connection in open_connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        with self._lock:
            timers = list(self._parse_timers.values())
            self._parse_timers.clear()
        for timer in timers:
            timer.cancel()
        server.server_close()
        self._server = self._thread = None

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the sandbox is not running")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._server.port}"

    def received(self) -> list[ReceivedVideo]:
        with self._lock:
            return [stored.video for stored in self._videos.values()]

    def requests(self) -> list[RequestRecord]:
        """Every upload request, in the order of arrival."""
        with self._lock:
            return sorted(self._requests, key=lambda record: record.arrived_at)

    def list_queries(self) -> list[dict[str, Any]]:
        """The body of every list_videos request, in the order of arrival."""
        with self._lock:
            return list(self._list_queries)

    def inject(self, fault: str, times: int = 1, **params: Any) -> None:
        if fault not in FAULT_PARAMS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULT_PARAMS)}")
        unknown = set(params) - FAULT_PARAMS[fault]
        if unknown:
            raise ValueError(f"fault {fault!r} takes no parameter(s) {', '.join(sorted(unknown))}")
        if fault == "answer" and params.get("name") not in _CODES:
            raise ValueError(f"answer name is one of {', '.join(_CODES)}")
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._faults.extend(_Fault(fault, dict(params)) for _ in range(times))

    def set_account(self, state: str) -> None:
        if state not in ACCOUNT_STATES:
            raise ValueError(f"unknown account state {state!r}; known: {', '.join(ACCOUNT_STATES)}")
        self._account = state

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def video_status(self, video_no: str) -> str | None:
        with self._lock:
            stored = self._videos.get(video_no)
            return stored.status if stored else None

    def fail_next_parse(self, cause: str) -> None:
        with self._lock:
            self._parse_failures.append(cause)

    def answer(self, name: str, detail: str | None = None, data: Any = None, *, headers: _Headers = ()) -> _Answer:
        """One of the table's answers, in this sandbox's dialect; detail follows the vendor's text."""
        code = _CODES[name]
        text = code.text if detail is None else f"{code.text}: {detail}"
        if self.dialect == api.V1:
            wire_code: str | int = code.v1
            status = code.v1_status
        else:
            wire_code, status = code.v2, code.v2_status or code.v2
        body = json.dumps({"code": wire_code, "msg": text, "data": data}).encode()
        return _Answer(status, str(wire_code), body, headers=headers)

    def _wsgi_app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        arrived_at = time.monotonic()
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        answer: _Answer | None
        try:
            answer = self._route(method, path, environ, arrived_at)
        except (_AbortConnection, ClientDisconnected, OSError):
            answer = None
        status, code = (answer.http_status, answer.code) if answer else (0, None)
        if method == "POST" and path == UPLOAD_PATH:
            with self._lock:
                self._requests.append(RequestRecord(arrived_at, path, status, code))
        if self._request_log is not None:
            file = answer.file if answer else None
            filename, size = (file.filename, file.size) if file else (None, None)
            self._request_log.info(
                "sandbox_request",
                method=method,
                path=path,
                status=status,
                code=code,
                filename=filename,
                size=size,
                arrived_at=round(arrived_at, 6),
            )
        if answer is None:
            raise _AbortConnection
        self._stopping.wait(answer.stall_seconds)
        response = Response(answer.body, status=answer.http_status, content_type=answer.content_type)
        for name, value in answer.headers:
            response.headers[name] = value
        return response(environ, start_response)

    def _route(self, method: str, path: str, environ: WSGIEnvironment, arrived_at: float) -> _Answer:
        handlers = {UPLOAD_PATH: self._handle_upload, LIST_PATH: self._handle_list}
        handler = handlers.get(path)
        if handler is None:
            return self.answer("not_found", path)
        if method != "POST":
            return self.answer("method", method, headers=(("Allow", "POST"),))
        return handler(environ, arrived_at)

    def _authorized(self, environ: WSGIEnvironment) -> bool:
        presented: str = environ.get("HTTP_AUTHORIZATION", "")
        if self._api_key is None:
            return bool(presented.strip())
        return presented == self._api_key

    def _handle_upload(self, environ: WSGIEnvironment, arrived_at: float) -> _Answer:
        stream = get_input_stream(environ)
        with self._lock:
            within_rate = self._upload_window.admit(arrived_at)
            fault = self._faults.popleft() if self._faults else None
        if fault is None:
            return self._answer_upload(environ, stream, within_rate)
        return self._answer_fault(fault, environ, stream)

    def _answer_upload(self, environ: WSGIEnvironment, stream: IO[bytes], within_rate: bool) -> _Answer:
        if not within_rate:
            refusal = self.answer("rate_limited")
        elif not self._authorized(environ):
            refusal = self.answer("bad_key")
        elif self._account != "ok":
            refusal = self.answer(self._account)
        else:
            return self._receive(environ, stream)
        # Read the whole body first, so the client sees the answer rather than a broken pipe.
        _drain(stream)
        return refusal

    def _answer_fault(self, fault: _Fault, environ: WSGIEnvironment, stream: IO[bytes]) -> _Answer:
        params = fault.params
        if fault.name == "reset":
            after_bytes = params.get("after_bytes")
            half_the_body = (get_content_length(environ) or 0) // 2
            _drain(stream, half_the_body if after_bytes is None else int(after_bytes))
            raise _AbortConnection
        if fault.name == "slow":
            if params.get("accept", False):
                answer = self._answer_upload(environ, stream, within_rate=True)
            else:
                _drain(stream)
                answer = self.answer("server_error", "gateway timeout")
                answer = dataclasses.replace(answer, http_status=504)
            return dataclasses.replace(answer, stall_seconds=float(params.get("seconds", 10.0)))
        if fault.name == "trickle":
            slow = _Trickle(stream, float(params.get("bytes_per_second", 64 * 1024)), self._stopping)
            return self._answer_upload(environ, cast(IO[bytes], slow), within_rate=True)
        if fault.name == "answer" and params.get("landed", False):
            accepted = self._answer_upload(environ, stream, within_rate=True)
            return dataclasses.replace(self.answer(str(params["name"])), file=accepted.file)
        _drain(stream)
        if fault.name == "rate_limit":
            retry_after = params.get("retry_after")
            headers = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
            limited = self.answer("rate_limited", headers=headers)
            if self.dialect == api.V1:
                limited = dataclasses.replace(limited, http_status=int(params.get("http_status", 200)))
            return limited
        if fault.name == "server_error":
            return _server_error(int(params.get("status", 500)), bool(params.get("html", False)))
        if fault.name == "invalid_field":
            return self.answer("invalid", str(params.get("msg", "invalid field")))
        if fault.name == "answer":
            return self.answer(str(params["name"]))
        return self.answer(fault.name)

    def _receive(self, environ: WSGIEnvironment, stream: IO[bytes]) -> _Answer:
        try:
            fields, files = _parse_form(environ, stream)
        except _InvalidUpload as invalid:
            _drain(stream)
            return self.answer("invalid", str(invalid))
        _drain(stream)
        problem = _upload_problem(fields, files, self._max_file_bytes)
        file = files["file"][0] if files.get("file") else None
        if problem is not None or file is None:
            name, detail = problem or ("invalid", "file is required")
            return dataclasses.replace(self.answer(name, detail), file=file)
        video = self._accept(file, fields)
        data = {
            "videoNo": video.video_no,
            "videoName": video.video_name,
            "videoStatus": api.NOT_PARSED,
            "uploadTime": str(int(video.received_at * 1000)),
        }
        return dataclasses.replace(self.answer("success", data=data), file=file)

    def _accept(self, file: _FilePart, fields: _Fields) -> ReceivedVideo:
        stem = os.path.splitext(file.filename)[0]
        with self._lock:
            video = ReceivedVideo(
                video_no=f"VI{next(self._video_numbers):018d}",
                video_name=stem if self._video_names == "stem" else uuid.uuid4().hex,
                filename=file.filename,
                content_type=file.content_type,
                size=file.size,
                sha256=file.sha256,
                fields=fields,
                received_at=time.time(),
            )
            failure = self._parse_failures.popleft() if self._parse_failures else None
            self._videos[video.video_no] = _StoredVideo(video)
            timer = threading.Timer(self._parse_seconds, self._finish_parsing, args=(video.video_no, failure))
            timer.daemon = True
            self._parse_timers[video.video_no] = timer
        timer.start()
        return video

    def _finish_parsing(self, video_no: str, failure_cause: str | None) -> None:
        status = api.PARSED if failure_cause is None else self._failure_status
        with self._lock:
            self._parse_timers.pop(video_no, None)
            stored = self._videos[video_no]
            stored.status, stored.cause = status, failure_cause
            callbacks = stored.video.fields.get("callback", [])
        if callbacks and callbacks[0]:
            try:
                payload = {"videoNo": video_no, "status": status}
                requests.post(callbacks[0], json=payload, timeout=_CALLBACK_TIMEOUT_SECONDS)
            except requests.RequestException as error:
                _log.warning("sandbox_callback_failed", url=callbacks[0], video_no=video_no, error=str(error))

    def _handle_list(self, environ: WSGIEnvironment, arrived_at: float) -> _Answer:
        stream = get_input_stream(environ)
        raw = _read_at_most(stream, _MAX_LIST_BODY_BYTES + 1)
        _drain(stream)
        with self._lock:
            within_rate = self._list_window.admit(arrived_at)
        if not within_rate:
            return self.answer("rate_limited")
        if not self._authorized(environ) or self._account == "bad_key":
            return self.answer("bad_key")
        try:
            query = json.loads(raw or b"{}")
        except ValueError:
            return self.answer("invalid", "the body must be a JSON object")
        if not isinstance(query, dict) or len(raw) > _MAX_LIST_BODY_BYTES:
            return self.answer("invalid", f"the body must be a JSON object of at most {_MAX_LIST_BODY_BYTES} bytes")
        with self._lock:
            self._list_queries.append(query)
        page, size = _positive_int(query.get("page", 1)), _positive_int(query.get("size", 20))
        if page is None or size is None:
            return self.answer("invalid", "page and size must be positive integers")
        video_nos = query.get("video_nos")
        if video_nos is not None and (
            not isinstance(video_nos, list)
            or len(video_nos) > api.MAX_VIDEO_NOS
            or not all(isinstance(number, str) for number in video_nos)
        ):
            return self.answer("invalid", f"video_nos must be a list of at most {api.MAX_VIDEO_NOS} videoNos")
        with self._lock:
            listed = [_listed(stored) for stored in reversed(self._videos.values())]
        matching = [entry for entry in listed if _matches(entry, query)]
        videos = matching[(page - 1) * size : page * size]
        data = {"videos": videos, "total_count": str(len(matching)), "current_page": page}
        return self.answer("success", data=data)


def _matches(entry: dict[str, Any], query: dict[str, Any]) -> bool:
    """Whether a listed video passes the query's filters; without a unique_id, the scope is `default`."""
    if entry["unique_id"] != (query.get("unique_id") or api.DEFAULT_SCOPE):
        return False
    for name in ("video_no", "status"):
        if query.get(name) not in (None, "") and entry[name] != query[name]:
            return False
    if query.get("video_nos") is not None and entry["video_no"] not in query["video_nos"]:
        return False
    return query.get("tag") in (None, "") or query["tag"] in entry.get("tags", ())


def _listed(stored: _StoredVideo) -> dict[str, Any]:
    video = stored.video
    entry: dict[str, Any] = {
        "video_no": video.video_no,
        "video_name": video.video_name,
        "status": stored.status,
        "cause": stored.cause or "null",
        "size": str(video.size),
        "duration": "0",
        "create_time": str(int(video.received_at * 1000)),
        "unique_id": video.scope,
    }
    # Tags are listed once a video is parsed, not before.
    if stored.status != api.NOT_PARSED:
        entry["tags"] = [*video.tags, API_TAG]
    return entry


def _server_error(status: int, html: bool) -> _Answer:
    """A 5xx with a JSON body of the sandbox's own, or the HTML page a proxy in front would send."""
    if not html:
        body = json.dumps({"code": "S500", "msg": "Internal server error", "data": None}).encode()
        return _Answer(status, "S500", body)
    title = f"{status} {http.HTTPStatus(status).phrase}"
    page = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
    return _Answer(status, None, page.encode(), content_type="text/html")


def parse_rate(text: str) -> float:
    """An account's upload rate, per second: "1/s", "1/60s", "2/min", "1/h", or a number of uploads per second."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?)?\s*(s|sec|min|h))?\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a rate such as 1/s, 1/60s, 2/min or 0.5")
    count, span, unit = float(match[1]), float(match[2] or 1), match[3] or "s"
    seconds = span * {"s": 1, "sec": 1, "min": 60, "h": 3600}[unit]
    if count <= 0:
        raise ValueError(f"{text!r} allows no uploads at all")
    return count / seconds


def serve(
    host: str,
    port: int,
    api_key: str | None,
    *,
    dialect: str = api.V1,
    rate_per_second: float = 1.0,
) -> None:
    """Run the sandbox in the foreground until Ctrl-C or SIGTERM."""
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous_handler = signal.signal(signal.SIGTERM, request_stop)
    try:
        with Sandbox(
            host, port, api_key=api_key, dialect=dialect, rate_per_second=rate_per_second, log_requests=True
        ) as sandbox:
            _request_logger().info(
                "sandbox_listening",
                url=sandbox.url,
                dialect=dialect,
                uploads_per_second=rate_per_second,
                api_key_required=api_key is not None,
            )
            with contextlib.suppress(KeyboardInterrupt):
                stop_requested.wait()
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
