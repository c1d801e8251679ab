"""Talking to memories.ai: the streaming upload, what each answer means, and how fast to ask.

The API key lives in one place, the session's Authorization header. It is never logged and never part of
an exception message: requests puts the URL in its errors, never the headers.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import requests
import structlog
from requests.adapters import HTTPAdapter
from requests_toolbelt import MultipartEncoder
from urllib3.util.retry import Retry

from .config import Folder
from .ledger import Ledger, Pause, Row

log = structlog.get_logger()

READ_BLOCK = 1 << 20
FINGERPRINT_SAMPLE = 1 << 20
INDEXING_WINDOW_SECONDS = 2 * 3600

Kind = Literal["uploaded", "rate_limited", "transient", "account", "refused", "unrecognised"]


class FileChanged(Exception):
    """The file is no longer the one that was validated; the body was abandoned before its end."""


class Abandoned(Exception):
    """The daemon is shutting down and gave up this upload before its end."""


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    message: str
    video_no: str | None = None
    retry_after: float | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter: base * factor**(n-1), at most cap, spread by +-jitter."""

    base: float = 5.0
    factor: float = 2.0
    cap: float = 1800.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        exponent = min(max(attempt - 1, 0), 60)
        raw = min(self.cap, self.base * self.factor**exponent)
        return max(0.0, raw * (1 + self.jitter * (2 * rng() - 1)))


RATE_LIMIT_POLICY = RetryPolicy(base=2.0, factor=2.0, cap=120.0, jitter=0.3)


def fingerprint(fd: int, size: int) -> str:
    """The size and the first and last MiB: cheap to take, and different for any new recording."""
    digest = hashlib.sha256(str(size).encode())
    digest.update(os.pread(fd, FINGERPRINT_SAMPLE, 0))
    if size > FINGERPRINT_SAMPLE:
        digest.update(os.pread(fd, FINGERPRINT_SAMPLE, max(size - FINGERPRINT_SAMPLE, FINGERPRINT_SAMPLE)))
    return digest.hexdigest()


class RateLimiter:
    """Evenly spaced requests, a token bucket with a burst of one, shared by every worker.

    A burst-then-refill bucket would let `rate` requests go out back to back and break the server's
    sliding one-second window; spacing every request by 1/rate (plus a hair, for scheduling jitter)
    never does.
    """

    MARGIN = 0.015

    def __init__(self, rate_per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = (1.0 + self.MARGIN) / rate_per_second
        self.clock = clock
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for this request's slot. False when stop was set first; the slot is then given back."""
        with self._lock:
            now = self.clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        while True:
            wait = slot - self.clock()
            if wait <= 0:
                return True
            if stop.wait(wait):
                with self._lock:
                    if self._next == slot + self.interval:
                        self._next = slot
                return False


class SnapshotReader:
    """The file part of the body: reads big blocks from one descriptor and checks the file at the end.

    Before the last block goes out, size, mtime and inode are compared with what was validated; on any
    change it raises, so the server never receives a complete body of mixed or truncated bytes.
    """

    def __init__(
        self,
        fd: int,
        expected: os.stat_result,
        path: str,
        abandon: threading.Event,
        *,
        before_last_block: Callable[[], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.fd = fd
        self.expected = expected
        self.path = path
        self.abandon = abandon
        self.before_last_block = before_last_block
        self.progress = progress
        self.position = 0
        self.size = expected.st_size

    @property
    def len(self) -> int:
        return self.size - self.position

    def read(self, amount: int = -1) -> bytes:
        if self.abandon.is_set():
            raise Abandoned("shutting down")
        remaining = self.size - self.position
        if remaining <= 0:
            return b""
        amount = remaining if amount < 0 else min(max(amount, READ_BLOCK), remaining)
        block = os.pread(self.fd, amount, self.position)
        if len(block) != amount:
            raise FileChanged(f"the file shrank during upload (read {self.position + len(block)} of {self.size})")
        self.position += amount
        if self.position == self.size:
            self._check_unchanged()
            if self.before_last_block:
                self.before_last_block()
        if self.progress:
            self.progress(self.position)
        return block

    def _check_unchanged(self) -> None:
        now = os.fstat(self.fd)
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            raise FileChanged("the file was deleted during upload") from None
        identity = (self.expected.st_size, self.expected.st_mtime_ns, self.expected.st_ino)
        if (now.st_size, now.st_mtime_ns, now.st_ino) != identity:
            raise FileChanged("the file was modified during upload")
        if (named.st_ino, named.st_dev) != (self.expected.st_ino, self.expected.st_dev):
            raise FileChanged("the file was replaced during upload")


class _BlockReader:
    """Hands http.client blocks of at least 1 MiB: its own 8 KiB reads cost several times curl's CPU."""

    def __init__(self, encoder: MultipartEncoder) -> None:
        self.encoder = encoder
        self.len = encoder.len

    def read(self, amount: int = -1) -> bytes:
        block: bytes = self.encoder.read(max(amount, READ_BLOCK))
        return block


ACCOUNT_PATTERNS = (
    (
        "the API key was refused",
        re.compile(r"api[ _-]?key|apikey|unauthori[sz]ed|forbidden|token|auth", re.I),
    ),
    (
        "the account's balance is insufficient",
        re.compile(r"balance|credit|recharge|quota|arrear|payment", re.I),
    ),
    (
        "the account reached its indexing cap",
        re.compile(r"index|pars(e|ing)|concurren|in progress|unparsed", re.I),
    ),
)
FIELD_PATTERNS = re.compile(
    r"invalid|must|format|exceed|too (long|many|large)|not (allowed|supported)|empty|unsupported|"
    r"extension|content.type|length|tags?\b|latitude|longitude|datetime|callback|camera|unique",
    re.I,
)


def _retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def classify(status: int, body: Any, headers: Any, now: float | None = None) -> Outcome:
    """What an answer means for the file and for the account, from the HTTP status and code/msg."""
    now = time.time() if now is None else now
    retry_after = _retry_after(headers.get("Retry-After"), now)
    code = str(body.get("code")) if isinstance(body, dict) and "code" in body else None
    message = str(body.get("msg") or "") if isinstance(body, dict) else ""
    seen = f"HTTP {status}" + (f", code {code}" if code else "") + (f": {message}" if message else "")
    if code == "0000" and status == 200:
        data = body.get("data") or {}
        video_no = data.get("videoNo") if isinstance(data, dict) else None
        if video_no:
            return Outcome("uploaded", "success", video_no=str(video_no))
        return Outcome("transient", f"{seen}, but no videoNo in the answer")
    if code == "0429" or status == 429:
        return Outcome("rate_limited", seen, retry_after=retry_after)
    if status in (401, 403):
        return Outcome("account", f"the API key was refused ({seen})", retry_after=retry_after)
    if status >= 500 or status in (408, 425) or (code is None and status != 413):
        return Outcome("transient", seen, retry_after=retry_after)
    for reason, pattern in ACCOUNT_PATTERNS:
        if pattern.search(message):
            return Outcome("account", f"{reason} ({seen})", retry_after=retry_after)
    if status == 413 or FIELD_PATTERNS.search(message):
        return Outcome("refused", seen)
    return Outcome("unrecognised", seen, retry_after=retry_after)


class Client:
    """One HTTP session to the API. Every call has a timeout; urllib3 never re-sends a consumed body."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        min_bytes_per_second: int = 32 * 1024,
        list_rate_per_second: float = 4.0,
    ) -> None:
        self.upload_url = f"{base_url}/serve/api/v1/upload"
        self.list_url = f"{base_url}/serve/api/v1/list_videos"
        self.timeout = (connect_timeout, read_timeout)
        # urllib3 sends the body under the connect timeout, and each 1 MiB block must go out within it:
        # so this is also the upload's minimum throughput, and a stalled server is given up on.
        self.upload_timeout = (max(connect_timeout, READ_BLOCK / min_bytes_per_second), read_timeout)
        self.list_limiter = RateLimiter(list_rate_per_second)
        self.closing = threading.Event()
        self.session = requests.Session()
        self.session.trust_env = False
        adapter = HTTPAdapter(max_retries=Retry(total=0, connect=0, read=0, redirect=0, status=0))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["Authorization"] = api_key
        self.session.headers["User-Agent"] = "memories-ingest"

    def close(self) -> None:
        self.closing.set()
        self.session.close()

    def list_videos(
        self, *, unique_id: str | None, page: int = 1, size: int = 100, video_no: str | None = None
    ) -> list[ListedVideo]:
        """One page of the account's videos, newest first; raises ListFailed on any unusable answer."""
        query: dict[str, Any] = {"page": page, "size": size}
        if unique_id:
            query["unique_id"] = unique_id
        if video_no:
            query["video_no"] = video_no
        if not self.list_limiter.acquire(self.closing):
            raise ListFailed("shutting down")
        try:
            response = self.session.post(self.list_url, json=query, timeout=self.timeout, allow_redirects=False)
            body = response.json()
        except requests.RequestException as error:
            raise ListFailed(f"list_videos failed: {_reason(error)}") from None
        except ValueError:
            raise ListFailed(f"list_videos answered HTTP {response.status_code} without JSON") from None
        if not isinstance(body, dict) or body.get("code") != "0000":
            code = body.get("code") if isinstance(body, dict) else None
            raise ListFailed(f"list_videos answered HTTP {response.status_code}, code {code}")
        videos = (body.get("data") or {}).get("videos") or []
        return [_listed(item) for item in videos if isinstance(item, dict)]

    def find_upload(
        self, *, unique_id: str | None, name: str, size: int, sent_at: float, known: set[str], pages: int = 10
    ) -> ListedVideo | None:
        """The video an unanswered upload created, if the server has it: same size, created after the send.

        Clocks differ, so the window opens ten minutes before the send; a video already in the ledger never
        matches. A name match is preferred, since the server may store the file under a name of its own.
        """
        window_start = sent_at - 600
        candidates: list[ListedVideo] = []
        for page in range(1, pages + 1):
            videos = self.list_videos(unique_id=unique_id, page=page)
            for video in videos:
                if video.video_no in known or video.size != size:
                    continue
                if video.created_at is None or video.created_at >= window_start:
                    candidates.append(video)
            oldest = min((v.created_at for v in videos if v.created_at is not None), default=None)
            if not videos or (oldest is not None and oldest < window_start):
                break
        named = [v for v in candidates if v.name == name]
        best = named or candidates
        return best[0] if best else None

    def upload(
        self,
        reader: SnapshotReader,
        filename: str,
        content_type: str,
        fields: Sequence[tuple[str, str]],
    ) -> Outcome:
        """Stream one file; FileChanged and Abandoned pass through, network errors become transient."""
        encoder = MultipartEncoder(fields=[*fields, ("file", (filename, reader, content_type))])
        try:
            response = self.session.post(
                self.upload_url,
                data=_BlockReader(encoder),
                headers={"Content-Type": encoder.content_type},
                timeout=self.upload_timeout,
                allow_redirects=False,
            )
        except requests.Timeout as error:
            return Outcome("transient", f"timed out: {type(error).__name__}")
        except requests.ConnectionError as error:
            return Outcome("transient", f"connection failed: {_reason(error)}")
        except requests.RequestException as error:
            return Outcome("transient", f"request failed: {_reason(error)}")
        with response:
            if 300 <= response.status_code < 400:
                return Outcome(
                    "transient",
                    f"HTTP {response.status_code} redirect to {response.headers.get('Location', '?')} "
                    "not followed: check api.base_url",
                )
            try:
                body: Any = response.json()
            except ValueError:
                body = None
            return classify(response.status_code, body, response.headers)


class ListFailed(Exception):
    """list_videos did not answer usefully; what is uncertain stays uncertain."""


@dataclass(frozen=True)
class ListedVideo:
    video_no: str
    name: str | None
    size: int | None
    created_at: float | None
    status: str | None
    cause: str | None


def _listed(item: dict[str, Any]) -> ListedVideo:
    def number(key: str) -> float | None:
        try:
            return float(item[key])
        except (KeyError, TypeError, ValueError):
            return None

    size = number("size")
    created = number("create_time")
    return ListedVideo(
        video_no=str(item.get("video_no") or item.get("videoNo") or ""),
        name=item.get("video_name") or item.get("videoName"),
        size=None if size is None else int(size),
        created_at=None if created is None else created / 1000,
        status=item.get("status"),
        cause=item.get("cause"),
    )


def _reason(error: Exception) -> str:
    """The innermost cause of a requests error, without the noise of urllib3's wrappers."""
    cause: BaseException = error
    while cause.__context__ is not None and cause.__context__ is not cause:
        cause = cause.__context__
    text = str(cause) or type(cause).__name__
    return re.sub(r"<[^>]+>: ", "", text)[:300]


def capture_time(row: Row) -> str:
    """When the file says it was recorded (MediaInfo.creation_time), else its mtime, in this host's time zone."""
    created = (row.media or {}).get("creation_time")
    when = datetime.fromisoformat(str(created)) if created else datetime.fromtimestamp(row.mtime_ns / 1e9, timezone.utc)
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def upload_fields(folder: Folder, row: Row) -> list[tuple[str, str]]:
    """The form fields of one upload. ``folder.metadata`` says whose place and camera win: the folder's or file's."""
    from .probe import MediaInfo

    from_file = MediaInfo.from_json(row.media) if row.media else None
    file_camera = from_file.camera_model if from_file else None
    file_place = (from_file.latitude, from_file.longitude) if from_file else (None, None)
    folder_place = (folder.latitude, folder.longitude)
    # A place is a pair: latitude and longitude always come from the same source.
    if folder.metadata == "file_first":
        camera_model = file_camera or folder.camera_model
        latitude, longitude = file_place if any(file_place) else folder_place
    else:
        camera_model = folder.camera_model or file_camera
        latitude, longitude = folder_place if any(folder_place) else file_place

    fields: list[tuple[str, str]] = []
    if folder.unique_id:
        fields.append(("unique_id", folder.unique_id))
    fields.append(("datetime_taken", capture_time(row)))
    fields.extend(("tags", tag) for tag in folder.tags)
    optional = {
        "camera_model": camera_model,
        "latitude": latitude,
        "longitude": longitude,
        "video_transcription_prompt": folder.video_transcription_prompt,
        "callback": folder.callback,
    }
    fields.extend((key, value) for key, value in optional.items() if value)
    if folder.retain_original_video is not None:
        fields.append(("retain_original_video", "true" if folder.retain_original_video else "false"))
    return fields


class Gate:
    """Whether uploads may go out now. Rate limits hold everyone briefly; account refusals pause for long.

    The pause is kept in the ledger, so `status` in another process shows it and a restart honours it.
    When a pause ends, one request goes out first as a probe; the rest wait for its answer.
    """

    def __init__(
        self,
        ledger: Ledger,
        account_check_seconds: float,
        rate_limit_policy: RetryPolicy = RATE_LIMIT_POLICY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.account_check_seconds = account_check_seconds
        self.rate_limit_policy = rate_limit_policy
        self.clock = clock
        self._lock = threading.Lock()
        self._pause: Pause | None = ledger.pause()
        self._probing = False
        self._rate_limit_streak = 0

    @property
    def pause(self) -> Pause | None:
        return self._pause

    def wait_open(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            with self._lock:
                pause = self._pause
                if pause is None:
                    return True
                remaining = pause.until - self.clock()
                if remaining <= 0 and not self._probing:
                    self._probing = True
                    return True
            stop.wait(min(max(remaining, 0.05), 1.0))
        return False

    def _hold(self, kind: str, reason: str, seconds: float) -> None:
        now = self.clock()
        with self._lock:
            since = self._pause.since if self._pause and self._pause.kind == kind else now
            self._pause = Pause(reason=reason, since=since, until=now + seconds, kind=kind)
            self._probing = False
        self.ledger.set_pause(self._pause)

    def rate_limited(self, outcome: Outcome) -> float:
        with self._lock:
            self._rate_limit_streak += 1
            streak = self._rate_limit_streak
        seconds = max(self.rate_limit_policy.delay(streak), outcome.retry_after or 0.0)
        self._hold("rate_limit", f"rate limited by the server ({outcome.message})", seconds)
        log.warning("rate limited: holding every upload", seconds=round(seconds, 1), streak=streak)
        return seconds

    def account_refused(self, outcome: Outcome) -> None:
        seconds = max(self.account_check_seconds, outcome.retry_after or 0.0)
        first = self._pause is None or self._pause.kind != "account"
        self._hold("account", outcome.message, seconds)
        log.error(
            "UPLOADS PAUSED: the account refused an upload; no file is marked failed for this",
            reason=outcome.message,
            next_check_in_seconds=round(seconds),
            first_refusal=first,
        )

    def answered(self) -> None:
        """An upload got a normal answer: whatever paused uploads is over."""
        with self._lock:
            self._rate_limit_streak = 0
            self._probing = False
            was = self._pause
            self._pause = None
        if was is not None:
            self.ledger.set_pause(None)
            log.warning("uploads resumed", paused_for=was.reason, paused_seconds=round(self.clock() - was.since))

    def indexing_window_full(self, limit: int | None) -> bool:
        """Pause before the server's cap: `limit` uploads in the last two hours that are not indexed yet."""
        if limit is None:
            return False
        now = self.clock()
        recent = self.ledger.uploads_since(now - INDEXING_WINDOW_SECONDS)
        if len(recent) < limit:
            return False
        frees_at = recent[len(recent) - limit] + INDEXING_WINDOW_SECONDS
        reason = f"{len(recent)} uploads of the last 2 h may still be indexing; upload.max_indexing is {limit}"
        first = self._pause is None or self._pause.kind != "indexing_window"
        self._hold("indexing_window", reason, min(max(frees_at - now, 1.0), 60.0))
        if first:
            log.warning("uploads paused before the indexing cap", reason=reason)
        return True

    def release_probe(self) -> None:
        with self._lock:
            self._probing = False
