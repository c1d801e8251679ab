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
from typing import Any, Literal

import requests
from requests.adapters import HTTPAdapter
from requests_toolbelt import MultipartEncoder
from urllib3.util.retry import Retry

READ_BLOCK = 1 << 20
FINGERPRINT_SAMPLE = 1 << 20

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

    MARGIN = 0.008

    def __init__(self, rate_per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / rate_per_second + self.MARGIN
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
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.fd = fd
        self.expected = expected
        self.path = path
        self.abandon = abandon
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
        return bytes(self.encoder.read(max(amount, READ_BLOCK)))


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
    ) -> None:
        self.upload_url = f"{base_url}/serve/api/v1/upload"
        self.list_url = f"{base_url}/serve/api/v1/list_videos"
        self.timeout = (connect_timeout, read_timeout)
        self.session = requests.Session()
        self.session.trust_env = False
        adapter = HTTPAdapter(max_retries=Retry(total=0, connect=0, read=0, redirect=0, status=0))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["Authorization"] = api_key
        self.session.headers["User-Agent"] = "memories-ingest"

    def close(self) -> None:
        self.session.close()

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
                timeout=self.timeout,
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


def _reason(error: Exception) -> str:
    """The innermost cause of a requests error, without the noise of urllib3's wrappers."""
    cause: BaseException = error
    while cause.__context__ is not None and cause.__context__ is not cause:
        cause = cause.__context__
    text = str(cause) or type(cause).__name__
    return re.sub(r"<[^>]+>: ", "", text)[:300]
