"""Talking to memories.ai: the streaming upload, what each answer means, and how fast to ask.

The API key lives in one place, the session's Authorization header. It is never logged and never part of
an exception message: requests puts the URL in its errors, never the headers.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import requests
import structlog
import urllib3
from requests.adapters import HTTPAdapter
from requests_toolbelt import MultipartEncoder
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from . import api
from .api import Outcome, classify
from .config import Folder
from .files import Version, identity_tag
from .inspector import MediaInfo
from .keys import keep_secret, key_fingerprint
from .ledger import Row
from .pacing import RateLimiter

log = structlog.get_logger()

READ_BLOCK = 1 << 20
# How far ahead of the socket the kernel is asked to read: while one block is on the wire, the next two are
# already coming off the disk. Page cache, not our memory: the daemon's RSS stays flat whatever the file's size.
PREFETCH_BYTES = 2 * READ_BLOCK
# list_videos allows 5 requests per second; one less leaves room for another process on the same key.
LIST_RATE_PER_SECOND = api.LIST_RATE_PER_SECOND - 1


class FileChanged(Exception):
    """The file is no longer the one that was validated; the body was abandoned before its end."""


class Abandoned(Exception):
    """The daemon is shutting down and gave up this upload before its end."""


# What to do once the connection is open, just before the request line goes out: wait for the upload's slot.
_before_send: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("before_send", default=None)


class _SlotBeforeSend:
    """A connection that runs the caller's before_send once it is connected, right before sending the request.

    Connecting takes a variable time (a handshake, TLS); waiting for the slot after it means the server sees
    requests as far apart as their slots are.
    """

    def request(self, *args: Any, **kwargs: Any) -> None:
        connection: urllib3.connection.HTTPConnection = self  # type: ignore[assignment]
        before_send = _before_send.get()
        if before_send is not None:
            _before_send.set(None)
            if connection.sock is None:
                connection.connect()
            before_send()
        super().request(*args, **kwargs)  # type: ignore[misc]


class _SlottedHTTPConnection(_SlotBeforeSend, urllib3.connection.HTTPConnection):
    pass


class _SlottedHTTPSConnection(_SlotBeforeSend, urllib3.connection.HTTPSConnection):
    pass


class _SlottedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _SlottedHTTPConnection


class _SlottedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _SlottedHTTPSConnection


class _Adapter(HTTPAdapter):
    """No retries inside urllib3 (a consumed body must never be re-sent), and connections that take slots."""

    def __init__(self) -> None:
        super().__init__(max_retries=Retry(total=0, connect=0, read=0, redirect=0, status=0))

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _SlottedHTTPPool, "https": _SlottedHTTPSPool}


class SnapshotReader:
    """The file part of the body: reads big blocks from one descriptor and checks the file at the end.

    Before the last block goes out, size, mtime, inode and ctime are compared with what was validated; on any
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
        self._advised = 0
        self._advise(0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._read_ahead()

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
        self._read_ahead()
        if self.position == self.size:
            self._check_unchanged()
            if self.before_last_block:
                self.before_last_block()
        if self.progress:
            self.progress(self.position)
        return block

    def _read_ahead(self) -> None:
        """Ask the kernel for the blocks after this one, so that a cold disk and the network work at once."""
        ahead = min(self.size, self.position + PREFETCH_BYTES)
        if ahead > self._advised:
            self._advise(self._advised, ahead - self._advised, os.POSIX_FADV_WILLNEED)
            self._advised = ahead

    def _advise(self, offset: int, length: int, advice: int) -> None:
        # Advice only: a filesystem that ignores or refuses it still reads the file, just without the overlap.
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, offset, length, advice)

    def _check_unchanged(self) -> None:
        now = os.fstat(self.fd)
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            raise FileChanged("the file was deleted during upload") from None
        if (named.st_ino, named.st_dev) != (self.expected.st_ino, self.expected.st_dev):
            raise FileChanged("the file was replaced during upload")
        # The ctime too: a rewrite in place that restores the mtime (rsync --inplace -t, cp -p) changes only it.
        if Version.of(now) != Version.of(self.expected):
            raise FileChanged("the file was modified during upload")


class _BlockReader:
    """Hands http.client blocks of at least 1 MiB: its own 8 KiB reads cost several times curl's CPU."""

    def __init__(self, encoder: MultipartEncoder) -> None:
        self.encoder = encoder
        self.len = encoder.len

    def read(self, amount: int = -1) -> bytes:
        block: bytes = self.encoder.read(max(amount, READ_BLOCK))
        return block


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
        list_rate_per_second: float = LIST_RATE_PER_SECOND,
    ) -> None:
        self.upload_url = base_url + api.UPLOAD_PATH
        self.list_url = base_url + api.LIST_PATH
        self.timeout = (connect_timeout, read_timeout)
        # urllib3 sends the body under the connect timeout, and each 1 MiB block must go out within it:
        # so this is also the upload's minimum throughput, and a stalled server is given up on.
        self.upload_timeout = (max(connect_timeout, READ_BLOCK / min_bytes_per_second), read_timeout)
        self.list_limiter = RateLimiter(list_rate_per_second)
        self.closing = threading.Event()
        self.session = requests.Session()
        self.session.trust_env = False
        adapter = _Adapter()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.key_id = key_fingerprint(api_key)
        keep_secret(api_key)
        self.session.headers["Authorization"] = api_key
        self.session.headers["User-Agent"] = "memories-ingest"

    def close(self) -> None:
        self.closing.set()
        self.session.close()

    def list_videos(
        self,
        *,
        unique_id: str | None,
        page: int = 1,
        size: int = api.LIST_PAGE_SIZE,
        video_no: str | None = None,
        video_nos: Sequence[str] | None = None,
        tag: str | None = None,
    ) -> list[ListedVideo]:
        """One page of a scope's videos, newest first; raises ListFailed on any unusable answer.

        unique_id None is the scope `default`, where uploads without a unique_id go.
        """
        query: dict[str, Any] = {"page": page, "size": size}
        if unique_id:
            query["unique_id"] = unique_id
        if video_no:
            query["video_no"] = video_no
        if video_nos is not None:
            query["video_nos"] = list(video_nos)
        if tag:
            query["tag"] = tag
        if not self.list_limiter.acquire(self.closing):
            raise ListFailed("shutting down")
        try:
            response = self.session.post(self.list_url, json=query, timeout=self.timeout, allow_redirects=False)
            body = response.json()
        except requests.RequestException as error:
            raise ListFailed(f"list_videos failed: {_reason(error)}") from None
        except ValueError:
            raise ListFailed(f"list_videos answered HTTP {response.status_code} without JSON") from None
        if not api.listing_succeeded(body):
            outcome = classify(response.status_code, body, response.headers)
            raise ListFailed(f"list_videos was refused: {outcome.reason}", outcome)
        videos = (body.get("data") or {}).get("videos") or []
        return [_listed(item) for item in videos if isinstance(item, dict)]

    def find_upload(
        self,
        *,
        unique_id: str | None,
        tag: str,
        size: int,
        stem: str,
        sent_at: float,
        known: set[str],
        pages: int = 10,
    ) -> Evidence:
        """What list_videos says about an upload whose answer was lost.

        Proof is the file's identity tag, which every upload carries and which list_videos lists (and filters
        by) once a video is parsed. Without it, a video of the same size created since the send that is not
        yet parsed could be this upload, or another file's: it is counted, never taken. Clocks differ, so the
        window opens ten minutes before the send; a video already in the ledger is never a candidate.
        """
        tagged = [
            video
            for video in self.list_videos(unique_id=unique_id, tag=tag, size=api.LIST_PAGE_SIZE)
            if video.tags is not None and tag in video.tags
        ]
        if tagged:
            tagged.sort(key=lambda video: (video.created_at or 0.0, video.video_no))
            return Evidence(landed=tagged[0], copies=len(tagged))
        window_start = sent_at - CLOCK_SLACK_SECONDS
        unproven: list[ListedVideo] = []
        for page in range(1, pages + 1):
            videos = self.list_videos(unique_id=unique_id, page=page)
            unproven += [
                video
                for video in videos
                if video.size == size
                and video.video_no not in known
                and video.tags is None
                and (video.created_at is None or video.created_at >= window_start)
            ]
            oldest = min((v.created_at for v in videos if v.created_at is not None), default=None)
            if len(videos) < api.LIST_PAGE_SIZE or (oldest is not None and oldest < window_start):
                break
        return Evidence(unproven=tuple(unproven), named=tuple(v for v in unproven if v.name == stem))

    def upload(
        self,
        reader: SnapshotReader,
        filename: str,
        content_type: str,
        fields: Sequence[tuple[str, str]],
        *,
        before_send: Callable[[], None] | None = None,
    ) -> Outcome:
        """Stream one file; FileChanged and Abandoned pass through, network errors become transient.

        before_send runs once the connection is open, right before the request goes out: the pacer's slot.
        """
        encoder = MultipartEncoder(fields=[*fields, ("file", (filename, reader, content_type))])
        slot = _before_send.set(before_send)
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
        finally:
            _before_send.reset(slot)
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


# The API's clock is not ours: a video counts as created after a send from this long before it.
CLOCK_SLACK_SECONDS = 600.0


@dataclass(frozen=True)
class Evidence:
    """What list_videos shows of an upload that may have landed."""

    # The video that carries the file's identity tag, the oldest when several do (copies counts them all).
    landed: ListedVideo | None = None
    copies: int = 0
    # Videos that could be this upload but cannot be told apart yet: the same size, created since, not parsed.
    unproven: tuple[ListedVideo, ...] = ()
    # Of those, the ones the server named after the file's stem (it sometimes does).
    named: tuple[ListedVideo, ...] = ()


class ListFailed(Exception):
    """list_videos did not answer usefully; what is uncertain stays uncertain.

    outcome is what the API said, when it answered at all.
    """

    def __init__(self, message: str, outcome: Outcome | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True)
class ListedVideo:
    video_no: str
    name: str | None
    size: int | None
    created_at: float | None
    status: str | None
    cause: str | None
    # None until the video is parsed: the API lists tags only then.
    tags: tuple[str, ...] | None = None


def _listed(item: dict[str, Any]) -> ListedVideo:
    def number(key: str) -> float | None:
        try:
            return float(item[key])
        except (KeyError, TypeError, ValueError):
            return None

    size = number("size")
    created = number("create_time")
    tags = item.get("tags")
    return ListedVideo(
        video_no=str(item.get("video_no") or item.get("videoNo") or ""),
        name=item.get("video_name") or item.get("videoName"),
        size=None if size is None else int(size),
        created_at=None if created is None else created / 1000,
        status=item.get("status"),
        cause=item.get("cause"),
        tags=tuple(str(tag) for tag in tags) if isinstance(tags, list) else None,
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


def upload_fields(folder: Folder, row: Row, callback_url: str | None = None) -> list[tuple[str, str]]:
    """The form fields of one upload. ``folder.metadata`` says whose place and camera win: the folder's or file's.

    callback_url is the daemon's own listener, for folders that name no callback of their own.
    """
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
    if row.fingerprint:
        # The daemon's own tag: list_videos can prove later which file a video is, should an answer be lost.
        fields.append(("tags", identity_tag(row.fingerprint)))
    optional = {
        "camera_model": camera_model,
        "latitude": latitude,
        "longitude": longitude,
        "video_transcription_prompt": folder.video_transcription_prompt,
        "callback": folder.callback or callback_url,
    }
    fields.extend((key, value) for key, value in optional.items() if value)
    if folder.retain_original_video is not None:
        fields.append(("retain_original_video", "true" if folder.retain_original_video else "false"))
    return fields
