"""The sandbox itself: a WSGI app on a background thread, answering uploads and list queries."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http
import itertools
import json
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any, cast

import requests
import structlog
from structlog.typing import FilteringBoundLogger
from werkzeug.exceptions import ClientDisconnected
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Response
from werkzeug.wsgi import get_content_length, get_input_stream

from .. import api
from .codes import CODES
from .connection import FIRST_BYTE_KEY, AbortConnection, Trickle, request_handler, stamp_arrivals
from .form import Fields, FilePart, InvalidUpload, drain, parse_form, positive_int, read_at_most, upload_problem
from .listing import list_entry, matches
from .records import Answer, Fault, Headers, ReceivedVideo, RequestRecord, SlidingWindow, StoredVideo

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
    # Any answer of the code table (.codes) by name; landed: the video is stored although the answer refuses it.
    "answer": frozenset({"name", "landed"}),
    **{state: frozenset() for state in ACCOUNT_STATES if state != "ok"},
}
VIDEO_NAMES = ("internal", "stem")

_MAX_LIST_BODY_BYTES = 64 * 1024
_CALLBACK_TIMEOUT_SECONDS = 5.0

_log = structlog.get_logger(__name__)


def request_logger() -> FilteringBoundLogger:
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
        self._request_log = request_logger() if log_requests else None
        self._lock = threading.Lock()
        self._upload_window = SlidingWindow(rate_per_second)
        self._list_window = SlidingWindow(list_rate_per_second)
        self._faults: collections.deque[Fault] = collections.deque()
        self._account = "ok"
        self._parse_failures: collections.deque[str] = collections.deque()
        self._videos: dict[str, StoredVideo] = {}
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
        handler = request_handler(self._connections, self._connections_lock)
        self._server = make_server(self._host, self._port, self._wsgi_app, threaded=True, request_handler=handler)
        stamp_arrivals(self._server.socket)
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
        if fault == "answer" and params.get("name") not in CODES:
            raise ValueError(f"answer name is one of {', '.join(CODES)}")
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._faults.extend(Fault(fault, dict(params)) for _ in range(times))

    def set_account(self, state: str) -> None:
        if state not in ACCOUNT_STATES:
            raise ValueError(f"unknown account state {state!r}; known: {', '.join(ACCOUNT_STATES)}")
        self._account = state

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def faults_pending(self) -> int:
        """Injected faults no request has taken yet: a test knows its request met the fault when this drops."""
        with self._lock:
            return len(self._faults)

    def video_status(self, video_no: str) -> str | None:
        with self._lock:
            stored = self._videos.get(video_no)
            return stored.status if stored else None

    def fail_next_parse(self, cause: str) -> None:
        with self._lock:
            self._parse_failures.append(cause)

    def answer(self, name: str, detail: str | None = None, data: Any = None, *, headers: Headers = ()) -> Answer:
        """One of the table's answers, in this sandbox's dialect; detail follows the vendor's text."""
        code = CODES[name]
        text = code.text if detail is None else f"{code.text}: {detail}"
        if self.dialect == api.V1:
            wire_code: str | int = code.v1
            status = code.v1_status
        else:
            wire_code, status = code.v2, code.v2_status or code.v2
        body = json.dumps({"code": wire_code, "msg": text, "data": data}).encode()
        return Answer(status, str(wire_code), body, headers=headers)

    def _wsgi_app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        arrived_at = environ.get(FIRST_BYTE_KEY) or time.monotonic()
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        answer: Answer | None
        try:
            answer = self._route(method, path, environ, arrived_at)
        except (AbortConnection, ClientDisconnected, OSError):
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
            raise AbortConnection
        self._stopping.wait(answer.stall_seconds)
        response = Response(answer.body, status=answer.http_status, content_type=answer.content_type)
        for name, value in answer.headers:
            response.headers[name] = value
        return response(environ, start_response)

    def _route(self, method: str, path: str, environ: WSGIEnvironment, arrived_at: float) -> Answer:
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

    def _handle_upload(self, environ: WSGIEnvironment, arrived_at: float) -> Answer:
        stream = get_input_stream(environ)
        with self._lock:
            within_rate = self._upload_window.admit(arrived_at)
            fault = self._faults.popleft() if self._faults else None
        if fault is None:
            return self._answer_upload(environ, stream, within_rate)
        return self._answer_fault(fault, environ, stream)

    def _answer_upload(self, environ: WSGIEnvironment, stream: IO[bytes], within_rate: bool) -> Answer:
        if not within_rate:
            refusal = self.answer("rate_limited")
        elif not self._authorized(environ):
            refusal = self.answer("bad_key")
        elif self._account != "ok":
            refusal = self.answer(self._account)
        else:
            return self._receive(environ, stream)
        # Read the whole body first, so the client sees the answer rather than a broken pipe.
        drain(stream)
        return refusal

    def _answer_fault(self, fault: Fault, environ: WSGIEnvironment, stream: IO[bytes]) -> Answer:
        params = fault.params
        if fault.name == "reset":
            after_bytes = params.get("after_bytes")
            half_the_body = (get_content_length(environ) or 0) // 2
            drain(stream, half_the_body if after_bytes is None else int(after_bytes))
            raise AbortConnection
        if fault.name == "slow":
            if params.get("accept", False):
                answer = self._answer_upload(environ, stream, within_rate=True)
            else:
                drain(stream)
                answer = self.answer("server_error", "gateway timeout")
                answer = dataclasses.replace(answer, http_status=504)
            return dataclasses.replace(answer, stall_seconds=float(params.get("seconds", 10.0)))
        if fault.name == "trickle":
            slow = Trickle(stream, float(params.get("bytes_per_second", 64 * 1024)), self._stopping)
            return self._answer_upload(environ, cast(IO[bytes], slow), within_rate=True)
        if fault.name == "answer" and params.get("landed", False):
            accepted = self._answer_upload(environ, stream, within_rate=True)
            return dataclasses.replace(self.answer(str(params["name"])), file=accepted.file)
        drain(stream)
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

    def _receive(self, environ: WSGIEnvironment, stream: IO[bytes]) -> Answer:
        try:
            fields, files = parse_form(environ, stream)
        except InvalidUpload as invalid:
            drain(stream)
            return self.answer("invalid", str(invalid))
        drain(stream)
        problem = upload_problem(fields, files, self._max_file_bytes)
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

    def _accept(self, file: FilePart, fields: Fields) -> ReceivedVideo:
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
            self._videos[video.video_no] = StoredVideo(video)
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

    def _handle_list(self, environ: WSGIEnvironment, arrived_at: float) -> Answer:
        stream = get_input_stream(environ)
        raw = read_at_most(stream, _MAX_LIST_BODY_BYTES + 1)
        drain(stream)
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
        page, size = positive_int(query.get("page", 1)), positive_int(query.get("size", 20))
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
            listed = [list_entry(stored) for stored in reversed(self._videos.values())]
        matching = [entry for entry in listed if matches(entry, query)]
        videos = matching[(page - 1) * size : page * size]
        data = {"videos": videos, "total_count": str(len(matching)), "current_page": page}
        return self.answer("success", data=data)


def _server_error(status: int, html: bool) -> Answer:
    """A 5xx with a JSON body of the sandbox's own, or the HTML page a proxy in front would send."""
    if not html:
        body = json.dumps({"code": "S500", "msg": "Internal server error", "data": None}).encode()
        return Answer(status, "S500", body)
    title = f"{status} {http.HTTPStatus(status).phrase}"
    page = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
    return Answer(status, None, page.encode(), content_type="text/html")
