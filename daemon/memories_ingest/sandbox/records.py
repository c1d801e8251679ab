"""What the sandbox keeps: the videos and requests it received, pending faults, answers and rate windows."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

from .. import api
from ..files import IDENTITY_TAG_PREFIX
from .form import FilePart

Headers = tuple[tuple[str, str], ...]


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
class Fault:
    name: str
    params: dict[str, Any]


@dataclass
class StoredVideo:
    video: ReceivedVideo
    status: str = api.NOT_PARSED
    cause: str | None = None


@dataclass(frozen=True)
class Answer:
    http_status: int
    code: str | None
    body: bytes
    content_type: str = "application/json"
    headers: Headers = ()
    file: FilePart | None = None
    stall_seconds: float = 0.0


class SlidingWindow:
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
