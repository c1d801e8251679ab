"""What answers mean, how fast requests go out, and how the body is read."""

from __future__ import annotations

import itertools
import os
import threading
from email.utils import formatdate
from pathlib import Path

import pytest

from memories_ingest.uploader import (
    FileChanged,
    RateLimiter,
    RetryPolicy,
    SnapshotReader,
    classify,
    fingerprint,
)


def outcome(status: int, code: str | None = None, msg: str = "", headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    body = None if code is None else {"code": code, "msg": msg, "data": {"videoNo": "VI1"} if code == "0000" else None}
    return classify(status, body, headers or {}, now=1_000_000.0)


def test_success_gives_the_video_number() -> None:
    result = outcome(200, "0000", "success")
    assert result.kind == "uploaded" and result.video_no == "VI1"


@pytest.mark.parametrize("status", [200, 429])
def test_rate_limit_answers_in_either_form(status: int) -> None:
    assert outcome(status, "0429", "Request has exceeded the limit.").kind == "rate_limited"


def test_http_429_without_a_body_is_a_rate_limit() -> None:
    assert outcome(429).kind == "rate_limited"


def test_retry_after_in_seconds_and_as_a_date() -> None:
    assert outcome(429, headers={"Retry-After": "7"}).retry_after == 7
    date = formatdate(1_000_000.0 + 30, usegmt=True)
    assert outcome(503, headers={"Retry-After": date}).retry_after == pytest.approx(30, abs=1)


@pytest.mark.parametrize(
    ("status", "code", "msg", "kind"),
    [
        (401, "0401", "Invalid API key", "account"),
        (403, None, "", "account"),
        (200, "0401", "Invalid API key", "account"),
        (200, "0402", "Insufficient balance, please recharge", "account"),
        (200, "0409", "The number of videos being indexed has reached the limit", "account"),
        (500, None, "", "transient"),
        (502, "9999", "Internal error", "transient"),
        (200, None, "", "transient"),
        (200, "0400", "datetime_taken must be yyyy-MM-dd HH:mm:ss", "refused"),
        (200, "0400", "at most 20 tags", "refused"),
        (413, None, "", "refused"),
        (200, "7777", "something new", "unrecognised"),
    ],
)
def test_each_answer_is_classified(status: int, code: str | None, msg: str, kind: str) -> None:
    assert outcome(status, code, msg).kind == kind


def test_retry_policy_grows_to_its_cap_with_jitter() -> None:
    policy = RetryPolicy(base=5, factor=2, cap=60, jitter=0.2)
    assert policy.delay(1, rng=lambda: 0.5) == 5
    assert policy.delay(3, rng=lambda: 0.5) == 20
    assert policy.delay(50, rng=lambda: 0.5) == 60
    assert policy.delay(1, rng=lambda: 0.0) == pytest.approx(4)
    assert policy.delay(1, rng=lambda: 1.0) == pytest.approx(6)


class FakeClock:
    """Time that moves only when a waiter waits, so the limiter's schedule is checked exactly."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ClockEvent(threading.Event):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.now += timeout or 0
        return self.is_set()


def test_limiter_never_lets_two_requests_into_one_second() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, clock=clock)
    stop = ClockEvent(clock)
    times = []
    for _ in range(20):
        assert limiter.acquire(stop)
        times.append(clock.now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 1.0
    assert (times[-1] - times[0]) / 19 < 1.01


def test_limiter_spaces_evenly_at_higher_rates() -> None:
    clock = FakeClock()
    limiter = RateLimiter(4.0, clock=clock)
    stop = ClockEvent(clock)
    times = []
    for _ in range(12):
        limiter.acquire(stop)
        times.append(clock.now)
    for start in range(len(times)):
        in_window = [t for t in times if times[start] <= t < times[start] + 1.0]
        assert len(in_window) <= 4


def test_a_stopped_wait_gives_its_slot_back() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, clock=clock)
    stop = threading.Event()
    assert limiter.acquire(stop)
    stop.set()
    assert not limiter.acquire(stop)


def test_the_reader_returns_big_blocks_and_detects_a_change(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = SnapshotReader(fd, os.fstat(fd), str(path), threading.Event())
        first = reader.read(8192)
        assert len(first) == 1024 * 1024
        with path.open("ab") as grow:
            grow.write(b"more")
        reader.read(8192)
        reader.read(8192)
        with pytest.raises(FileChanged, match="modified"):
            reader.read(8192)
    finally:
        os.close(fd)


def test_the_reader_detects_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = SnapshotReader(fd, os.fstat(fd), str(path), threading.Event())
        replacement = tmp_path / "new.mp4"
        replacement.write_bytes(b"y" * 100)
        replacement.replace(path)
        with pytest.raises(FileChanged, match="replaced"):
            reader.read()
    finally:
        os.close(fd)


def test_fingerprint_changes_with_content_and_not_with_mtime(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    path.write_bytes(os.urandom(3 << 20))
    fd = os.open(path, os.O_RDONLY)
    first = fingerprint(fd, os.fstat(fd).st_size)
    os.close(fd)
    os.utime(path, (1, 1))
    fd = os.open(path, os.O_RDONLY)
    assert fingerprint(fd, os.fstat(fd).st_size) == first
    os.close(fd)
    with path.open("r+b") as handle:
        handle.seek(-10, os.SEEK_END)
        handle.write(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    assert fingerprint(fd, os.fstat(fd).st_size) != first
    os.close(fd)
