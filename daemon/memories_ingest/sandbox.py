"""A stand-in for the memories.ai API, served over loopback for the tests and the demo.

It enforces every documented upload rule, the per-account rate limits and the account states,
and it can inject what a real network and a real vendor do to a client (rate limits, 5xx answers,
connection resets, stalls), so the daemon's handling of each is exercised over real HTTP.
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

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

UPLOAD_PATH = "/serve/api/v1/upload"
LIST_PATH = "/serve/api/v1/list_videos"

MAX_FILE_BYTES = 3 * 1024**3
ALLOWED_EXTENSIONS = (".avi", ".mkv", ".mov", ".mp4")
MAX_TAGS = 20
ACCOUNT_STATES = ("ok", "insufficient_balance", "indexing_cap", "bad_key")
FAULT_PARAMS: dict[str, frozenset[str]] = {
    "rate_limit": frozenset({"http_status", "retry_after"}),
    "server_error": frozenset({"status", "html"}),
    "reset": frozenset({"after_bytes"}),
    "slow": frozenset({"seconds", "accept"}),
    "insufficient_balance": frozenset(),
    "indexing_cap": frozenset(),
    "bad_key": frozenset(),
    "invalid_field": frozenset({"msg"}),
}

_READ_SIZE = 1024 * 1024
# Text fields are buffered by the parser, so they get a cap; the file part is streamed. werkzeug also
# applies the cap to each read plus its leftover buffer, so it must stay well above _READ_SIZE.
_MAX_FIELD_BYTES = 4 * _READ_SIZE
_MAX_FORM_PARTS = 1000
_MAX_LIST_BODY_BYTES = 64 * 1024
_CALLBACK_TIMEOUT_SECONDS = 5.0
_DATETIME_TAKEN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")

_log = structlog.get_logger(__name__)
_Headers = tuple[tuple[str, str], ...]
_Fields = dict[str, list[str]]


@dataclass(frozen=True)
class ReceivedVideo:
    video_no: str
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
    def tags(self) -> list[str]:
        return list(self.fields.get("tags", []))


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
    status: str = "UNPARSE"
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


def _api_answer(code: str, msg: str, data: Any = None, *, http_status: int = 200, headers: _Headers = ()) -> _Answer:
    body = json.dumps({"code": code, "msg": msg, "data": data}).encode()
    return _Answer(http_status, code, body, headers=headers)


def _invalid(msg: str) -> _Answer:
    return _api_answer("0400", msg)


_RATE_LIMITED = _api_answer("0429", "Request has exceeded the limit.")
_INVALID_KEY = _api_answer("0401", "Invalid API key", http_status=401)
_ACCOUNT_ANSWERS = {
    "insufficient_balance": _api_answer("0402", "Insufficient balance, please recharge"),
    "indexing_cap": _api_answer("0409", "The number of videos being indexed has reached the limit"),
    "bad_key": _INVALID_KEY,
}


class _AbortConnection(BaseException):
    """Ends the connection without an answer (a BaseException: werkzeug answers 500 to an Exception)."""


class _InvalidUpload(Exception):
    pass


class _SlidingWindow:
    """At most `per_second` arrivals in any 1.0 s window; rejected arrivals count too, as they do upstream."""

    def __init__(self, per_second: float) -> None:
        self._per_second = per_second
        self._arrivals: collections.deque[float] = collections.deque()

    def admit(self, now: float) -> bool:
        while self._arrivals and self._arrivals[0] <= now - 1.0:
            self._arrivals.popleft()
        admitted = len(self._arrivals) < self._per_second
        self._arrivals.append(now)
        return admitted


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
    "camera_model": (lambda value: len(value) <= 200, "camera_model must be at most 200 characters"),
    "callback": (lambda value: len(value) <= 299, "callback must be at most 299 characters"),
    "retain_original_video": (_is_boolean, "retain_original_video must be true or false"),
}


def _upload_problem(fields: _Fields, files: dict[str, list[_FilePart]], max_file_bytes: int) -> str | None:
    if "file" in fields:
        return "file must be sent as a file part, with a filename"
    strays = sorted(set(files) - {"file"})
    if strays:
        return f"unexpected file part(s) {', '.join(strays)}: only 'file' may carry a file"
    parts = files.get("file", [])
    if not parts:
        return "file is required"
    if len(parts) > 1:
        return "exactly one file part is allowed"
    part = parts[0]
    if os.path.splitext(part.filename)[1].lower() not in ALLOWED_EXTENSIONS:
        return f"file extension must be one of {', '.join(ALLOWED_EXTENSIONS)} (got {part.filename!r})"
    if not part.content_type.lower().startswith("video/"):
        return f"file Content-Type must start with video/ (got {part.content_type!r})"
    if part.size == 0:
        return "file must not be empty"
    if part.size > max_file_bytes:
        return f"file must be at most {max_file_bytes} bytes (got {part.size})"
    if len(fields.get("tags", [])) > MAX_TAGS:
        return f"at most {MAX_TAGS} tags are allowed"
    for name, (is_valid, problem) in _FIELD_RULES.items():
        if not all(is_valid(value) for value in fields.get(name, [])):
            return problem
    return None


def _server_error(status: int, html: bool) -> _Answer:
    if not html:
        return _api_answer("9999", "Internal error", http_status=status)
    title = f"{status} {http.HTTPStatus(status).phrase}"
    body = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
    return _Answer(status, None, body.encode(), content_type="text/html")


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


class Sandbox:
    """The memories.ai upload and list endpoints on a local port, with injectable faults."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        rate_per_second: float = 1.0,
        list_rate_per_second: float = 5.0,
        parse_seconds: float = 0.5,
        max_file_bytes: int = MAX_FILE_BYTES,
        log_requests: bool = False,
    ) -> None:
        self._host = host
        self._port = port
        self._api_key = api_key
        self._parse_seconds = parse_seconds
        self._max_file_bytes = max_file_bytes
        self._request_log = _request_logger() if log_requests else None
        self._lock = threading.Lock()
        self._upload_window = _SlidingWindow(rate_per_second)
        self._list_window = _SlidingWindow(list_rate_per_second)
        self._faults: collections.deque[_Fault] = collections.deque()
        self._account = "ok"
        self._parse_failures: collections.deque[str] = collections.deque()
        self._videos: dict[str, _StoredVideo] = {}
        self._requests: list[RequestRecord] = []
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
        with self._lock:
            return sorted(self._requests, key=lambda record: record.arrived_at)

    def inject(self, fault: str, times: int = 1, **params: Any) -> None:
        if fault not in FAULT_PARAMS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULT_PARAMS)}")
        unknown = set(params) - FAULT_PARAMS[fault]
        if unknown:
            raise ValueError(f"fault {fault!r} takes no parameter(s) {', '.join(sorted(unknown))}")
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
            return _api_answer("0404", f"no such endpoint: {path}", http_status=404)
        if method != "POST":
            return _api_answer("0405", f"{method} is not allowed here", http_status=405, headers=(("Allow", "POST"),))
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
            refusal = _RATE_LIMITED
        elif not self._authorized(environ):
            refusal = _INVALID_KEY
        elif self._account != "ok":
            refusal = _ACCOUNT_ANSWERS[self._account]
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
                answer = _server_error(504, html=False)
            return dataclasses.replace(answer, stall_seconds=float(params.get("seconds", 10.0)))
        _drain(stream)
        if fault.name == "rate_limit":
            retry_after = params.get("retry_after")
            headers = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
            return dataclasses.replace(_RATE_LIMITED, http_status=int(params.get("http_status", 200)), headers=headers)
        if fault.name == "server_error":
            return _server_error(int(params.get("status", 500)), bool(params.get("html", False)))
        if fault.name == "invalid_field":
            return _invalid(str(params.get("msg", "invalid field")))
        return _ACCOUNT_ANSWERS[fault.name]

    def _receive(self, environ: WSGIEnvironment, stream: IO[bytes]) -> _Answer:
        try:
            fields, files = _parse_form(environ, stream)
        except _InvalidUpload as invalid:
            _drain(stream)
            return _invalid(str(invalid))
        _drain(stream)
        problem = _upload_problem(fields, files, self._max_file_bytes)
        file = files["file"][0] if files.get("file") else None
        if problem is not None or file is None:
            return dataclasses.replace(_invalid(problem or "file is required"), file=file)
        video = self._accept(file, fields)
        data = {
            "videoNo": video.video_no,
            "videoName": uuid.uuid4().hex,
            "videoStatus": "UNPARSE",
            "uploadTime": str(int(video.received_at * 1000)),
        }
        return dataclasses.replace(_api_answer("0000", "success", data), file=file)

    def _accept(self, file: _FilePart, fields: _Fields) -> ReceivedVideo:
        with self._lock:
            video = ReceivedVideo(
                video_no=f"VI{next(self._video_numbers):018d}",
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
        status = "PARSE" if failure_cause is None else "FAILED"
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
            return _RATE_LIMITED
        if not self._authorized(environ) or self._account == "bad_key":
            return _INVALID_KEY
        try:
            query = json.loads(raw or b"{}")
        except ValueError:
            return _invalid("the body must be a JSON object")
        if not isinstance(query, dict) or len(raw) > _MAX_LIST_BODY_BYTES:
            return _invalid(f"the body must be a JSON object of at most {_MAX_LIST_BODY_BYTES} bytes")
        page, size = _positive_int(query.get("page", 1)), _positive_int(query.get("size", 20))
        if page is None or size is None:
            return _invalid("page and size must be positive integers")
        filters = {name: query.get(name) for name in ("video_no", "unique_id", "status")}
        with self._lock:
            listed = [_listed(stored) for stored in reversed(self._videos.values())]
        matching = [
            entry
            for entry in listed
            if all(wanted in (None, "") or entry[name] == wanted for name, wanted in filters.items())
        ]
        videos = matching[(page - 1) * size : page * size]
        data = {"videos": videos, "total_count": str(len(matching)), "current_page": page}
        return _api_answer("0000", "success", data)


def _listed(stored: _StoredVideo) -> dict[str, Any]:
    video = stored.video
    return {
        "video_no": video.video_no,
        "video_name": video.filename,
        "status": stored.status,
        "cause": stored.cause,
        "size": str(video.size),
        "duration": "0",
        "create_time": str(int(video.received_at * 1000)),
        "unique_id": video.unique_id,
    }


def serve(host: str, port: int, api_key: str | None) -> None:
    """Run the sandbox in the foreground until Ctrl-C or SIGTERM."""
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous_handler = signal.signal(signal.SIGTERM, request_stop)
    try:
        with Sandbox(host, port, api_key=api_key, log_requests=True) as sandbox:
            _request_logger().info("sandbox_listening", url=sandbox.url, api_key_required=api_key is not None)
            with contextlib.suppress(KeyboardInterrupt):
                stop_requested.wait()
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
