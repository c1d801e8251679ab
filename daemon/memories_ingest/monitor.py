"""How the daemon is doing, for people and their tools: /metrics, /healthz and a status page, over HTTP.

Nothing here decides anything. The Daemon says what is alive, the ledger says where each file is, and the
upload workers report every attempt to Metrics. It is read-only, never shows the API key, and is loaded only
when monitor.listen asks for it.
"""

from __future__ import annotations

import html
import ipaddress
import os
import socket
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from . import view
from .config import Config
from .ledger import Ledger, Row
from .metrics import Metrics
from .schema import Pace
from .states import QUEUED, RETRYING
from .view import printable

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = structlog.get_logger()

PAUSE_KINDS = ("account", "indexing_window", "ledger")
# Below this, SQLite cannot be relied on to commit; BEGIN IMMEDIATE alone would not notice.
MIN_FREE_BYTES = 1 << 20
PAGE_REFRESH_SECONDS = 5


# -- metrics ----------------------------------------------------------------------------------------------


class LedgerCheck:
    """A second connection to the ledger, so that checks never queue behind the daemon's own lock."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # mode=rw: a ledger that vanished must be reported, not silently created empty.
            uri = f"file:{urllib.parse.quote(str(self.path))}?mode=rw"
            self._conn = sqlite3.connect(
                uri, uri=True, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
        return self._conn

    def problems(self) -> list[str]:
        """Why the ledger cannot be written now, if it cannot: read-only, locked for too long, or a full disk."""
        with self._lock:
            try:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            except sqlite3.Error as error:
                # A connection left inside a transaction would fail every later check: start afresh next time.
                self._close()
                return [f"the ledger {self.path} cannot be written: {error}"]
        try:
            disk = os.statvfs(self.path.parent)
        except OSError as error:
            return [f"the ledger's directory {self.path.parent} cannot be read: {error.strerror}"]
        if disk.f_bavail * disk.f_frsize < MIN_FREE_BYTES:
            return [f"the disk of the ledger {self.path} is full"]
        return []

    def oldest_waiting_since(self) -> float | None:
        """When the longest-waiting queued or retrying file last changed state."""
        with self._lock:
            found = (
                self._connection()
                .execute("SELECT MIN(updated_at) FROM files WHERE state IN (?, ?)", [QUEUED, RETRYING])
                .fetchone()
            )
        return None if found is None or found[0] is None else float(found[0])

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class LedgerCollector:
    """Gauges read from the ledger when Prometheus scrapes, so they are never stale and cost nothing between."""

    def __init__(
        self, ledger: Ledger, check: LedgerCheck, ceiling: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.ledger = ledger
        self.check = check
        self.ceiling = ceiling
        self.clock = clock

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("memories_ingest_files", "Files in the ledger, by state", labels=["state"]),
            GaugeMetricFamily(
                "memories_ingest_paused",
                "1 while every upload waits, labelled with why: account, indexing_window or ledger",
                labels=["reason"],
            ),
            GaugeMetricFamily(
                "memories_ingest_oldest_queued_seconds",
                "How long the longest-waiting queued or retrying file has waited; 0 when none waits",
            ),
            GaugeMetricFamily(
                "memories_ingest_upload_pace_per_second",
                "The upload pace learned from the API's 0429 answers, at most upload.rate_per_second",
            ),
        )

    def collect(self) -> Iterator[Metric]:
        files, paused, oldest, pace = self._families()
        for state, count in self.ledger.counts().items():
            files.add_metric([state], count)
        pause = self.ledger.pause()
        kinds = dict.fromkeys(PAUSE_KINDS, 0)
        if pause is not None:
            kinds[pause.kind] = 1
        for kind, flag in kinds.items():
            paused.add_metric([kind], flag)
        since = self.check.oldest_waiting_since()
        oldest.add_metric([], 0.0 if since is None else max(0.0, self.clock() - since))
        learned = Pace.stored(self.ledger.setting("pace"))
        pace.add_metric([], self.ceiling if learned is None else learned.rate)
        yield from (files, paused, oldest, pace)


# -- the HTTP endpoint ------------------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _QuietRequestHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Silenced: monitors poll every few seconds, and a line per poll would drown the journal."""


class MonitorServer:
    """/healthz, /metrics and a status page for people, on a small threaded HTTP server of its own.

    health() is the Daemon's view (threads and watching); the ledger's writability is checked here.
    """

    def __init__(self, config: Config, ledger: Ledger, metrics: Metrics, health: Callable[[], list[str]]) -> None:
        assert config.monitor.listen is not None
        self.host, self.port = parse_listen(config.monitor.listen)
        self.config = config
        self.ledger = ledger
        self.metrics = metrics
        self.health = health
        self.check = LedgerCheck(ledger.path)
        self.collector = LedgerCollector(ledger, self.check, config.upload.rate_per_second)
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Listen; raises OSError when the address is taken or cannot be bound."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # Bound here, not by werkzeug, which answers a taken port with sys.exit().
        with socket.create_server((self.host, self.port), family=family) as listener:
            self.port = listener.getsockname()[1]
            self._server = make_server(
                self.host, self.port, self, threaded=True, request_handler=_QuietRequestHandler, fd=listener.fileno()
            )
        self.metrics.registry.register(self.collector)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="monitor", daemon=True
        )
        self._thread.start()
        if not is_loopback(self.host):
            log.warning("the monitor is reachable from other hosts; it shows file paths, never the API key")
        log.info("monitor listening", url=self.url, endpoints=["/", "/healthz", "/metrics"])

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        thread.join()
        server.server_close()
        self.metrics.registry.unregister(self.collector)
        self.check.close()
        self._server = self._thread = None

    def problems(self) -> list[str]:
        return [*self.health(), *self.check.problems()]

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        try:
            response = self.respond(request)
        except Exception:
            log.exception("the monitor failed to answer", path=request.path)
            response = Response("internal error\n", 500, content_type="text/plain; charset=utf-8")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response(environ, start_response)

    def respond(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response("GET only\n", 405, {"Allow": "GET, HEAD"}, content_type="text/plain; charset=utf-8")
        if request.path == "/healthz":
            problems = self.problems()
            body = "ok\n" if not problems else "".join(f"{printable(problem)}\n" for problem in problems)
            return Response(body, 503 if problems else 200, content_type="text/plain; charset=utf-8")
        if request.path == "/metrics":
            # OpenMetrics for a Prometheus that asks for it, the classic text format for everyone else.
            encode, content_type = choose_encoder(request.headers.get("Accept", ""))
            return Response(encode(self.metrics.registry), 200, content_type=content_type)
        if request.path == "/":
            page = render_page(
                view.status(self.ledger), self.ledger.recent_uploads(), self.problems(), self.config, time.time()
            )
            response = Response(page, 200, content_type="text/html; charset=utf-8")
            # The page is data, never code: file names come from whoever can write to a watched folder.
            response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'"
            return response
        return Response("not found: try /, /healthz or /metrics\n", 404, content_type="text/plain; charset=utf-8")


# -- the status page --------------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(printable(value), quote=True)


def _when(timestamp: float | None, now: float) -> str:
    return view.clock(timestamp, now)


def _table(headings: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> str:
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="quiet">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(heading)}</th>" for heading in headings)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: .2em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left; padding: .3em .6em; vertical-align: top; }
thead th { border-bottom: 2px solid #ccc; } tbody tr:nth-child(odd) { background: #f6f6f6; }
td { overflow-wrap: anywhere; }
.ok { color: #176b2c; } .quiet { color: #777; }
.banner { padding: .6em 1em; border-radius: 4px; background: #fff4e5; border: 1px solid #f0c36d; }
.problems { padding: .6em 1em .6em 2em; border-radius: 4px; background: #fdecea; border: 1px solid #e0a0a0; }
.counts span { display: inline-block; margin: 0 1.2em .4em 0; } .counts b { font-size: 1.3em; }
progress { width: 12em; }
"""


def render_page(
    document: Mapping[str, Any], uploads: Sequence[Row], problems: Sequence[str], config: Config, now: float
) -> str:
    """The status page: Ledger.status() and the recent uploads, every value escaped."""
    sections = [
        *_overview(document, problems, now),
        *_uploading(document, now),
        *_recent_uploads(uploads, now),
        *_rejected_and_notices(document, now),
        *_watched_folders(document, config),
    ]
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{PAGE_REFRESH_SECONDS}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>memories-ingest</title><style>{STYLE}</style></head><body>"
        f'<h1>memories-ingest</h1><p class="quiet">{_e(config.source)} &middot; as of {_when(now, now)}</p>'
        + "".join(sections)
        + "</body></html>\n"
    )


def _overview(document: Mapping[str, Any], problems: Sequence[str], now: float) -> list[str]:
    """The counts per state, the health, and whatever holds the daemon back: a rejected config, a pause, a pace."""
    if problems:
        health = '<ul class="problems">' + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul>"
    else:
        health = '<p class="ok">Healthy: every worker and observer is alive, and the ledger is writable.</p>'
    counts = "".join(f"<span>{_e(state)} <b>{count}</b></span>" for state, count in document["counts"].items() if count)
    sections = [
        f'<p class="counts">{counts or "the ledger is empty"}</p>',
        health,
    ]
    rejected = document.get("rejected_reload")
    if rejected:
        sections.append(
            f'<div class="problems"><p>The config on disk was rejected at {_when(rejected["at"], now)}; '
            "the daemon runs the one it had:</p><ul>"
            + "".join(f"<li>{_e(problem)}</li>" for problem in rejected["problems"])
            + "</ul></div>"
        )
    paused = document["paused"]
    if paused:
        until = f"next trial {_when(paused['until'], now)}" if paused["until"] else "until a person lifts it"
        sections.append(
            f'<p class="banner">Uploads are paused since {_when(paused["since"], now)}, {until}: '
            f"{_e(paused['reason'])}. To lift it: {_e(paused['how_to_lift'])}.</p>"
        )
    pace = view.describe_pace(document)
    if pace is not None:
        sections.append(f"<p>Upload pace: {_e(pace)}.</p>")
    return sections


def _uploading(document: Mapping[str, Any], now: float) -> list[str]:
    in_flight = [
        (
            _e(upload["path"]),
            str(upload["attempt"]),
            f'<progress max="100" value="{upload["percent"]:.1f}"></progress> {upload["percent"]:.1f}%',
            f"{view.size(upload['bytes_sent'])} of {view.size(upload['size'])}",
            f"{view.size(upload['bytes_per_second'])}/s",
            "-" if upload["eta_seconds"] is None else f"{upload['eta_seconds']:.0f} s",
        )
        for upload in document["uploading"]
    ]
    sections = [
        "<h2>Uploading</h2>",
        _table(("file", "attempt", "progress", "sent", "speed", "ETA"), in_flight, "nothing right now"),
    ]
    retry = document["next_retry"]
    if retry:
        sections.append(f"<p>Next retry: {_e(retry['path'])} at {_when(retry['at'], now)} ({_e(retry['error'])})</p>")
    return sections


def _recent_uploads(uploads: Sequence[Row], now: float) -> list[str]:
    rows = (
        (_when(row.uploaded_at, now), _e(row.path), _e(row.unique_id or "-"), view.size(row.size), _e(row.video_no))
        for row in uploads
    )
    return ["<h2>Recent uploads</h2>", _table(("when", "file", "scope", "size", "videoNo"), rows, "none yet")]


def _rejected_and_notices(document: Mapping[str, Any], now: float) -> list[str]:
    sections = []
    for heading, noted in (("Rejected or failed", document["problems"]), ("Notices", document["notices"])):
        sections.append(f"<h2>{heading}</h2>")
        sections.append(
            _table(
                ("when", "state", "file", "why"),
                ((_when(e["at"], now), _e(e["state"]), _e(e["path"]), _e(e["error"])) for e in noted),
                "none",
            )
        )
    return sections


def _watched_folders(document: Mapping[str, Any], config: Config) -> list[str]:
    modes = {folder["path"]: folder for folder in document["folders"]}
    rows = (
        (
            _e(f.path),
            _e(f.unique_id or "-"),
            "yes" if f.recursive else "no",
            _e(", ".join(f.tags)),
            _e(f"{modes[str(f.path)]['mode']}: {modes[str(f.path)]['why']}" if str(f.path) in modes else "-"),
        )
        for f in config.folders
    )
    return ["<h2>Watched folders</h2>", _table(("folder", "scope", "recursive", "tags", "watched by"), rows, "none")]
