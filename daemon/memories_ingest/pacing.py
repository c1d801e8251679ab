"""How fast, and whether, to ask: the retry policy, the pace of uploads learned from 0429 answers, and the gate.

The account's upload limit is shared by every key and every process, and every ``0429`` may have cost a whole
body, so the daemon finds the limit and stays under it. ``upload.rate_per_second`` is a ceiling. The pace starts
there; a ``0429`` marks the pace as too fast and falls back to the fastest pace known to work (or half, when none
is known yet); every run of accepted uploads marks the pace as good and moves halfway towards the too-fast mark,
doubling while there is none. After a long clean run the mark is forgotten, so a raised limit is found again.

The pace and the next free slot live in the ledger, so they survive a restart and every process on the ledger
(the daemon, `upload`) takes its slots from one schedule, in one transaction each. A slot is taken at the last
moment, once the connection is open and just before the request line goes out, so that the spacing the server
sees is the spacing the pacer kept.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import structlog

from .api import Outcome
from .ledger import Ledger, Pause
from .schema import FLOOR_PER_SECOND, MARGIN, PACE_KEY, Pace

log = structlog.get_logger()

# A pace is known to work after this many accepted uploads in a row at it.
GOOD_RUN = 5
# Within this ratio of the fastest pace known to work, the too-fast mark is close enough: stop searching.
CLOSE_ENOUGH = 1.2
# After this many accepted uploads in a row at a settled pace, forget the too-fast mark and search again.
FORGET_AFTER = 200
# wait_turn lets an upload open its connection this long before its slot.
LEAD_SECONDS = 0.5
INDEXING_WINDOW_SECONDS = 2 * 3600


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


class RateLimiter:
    """Evenly spaced requests within one process, a token bucket with a burst of one, shared by its threads.

    A burst-then-refill bucket would let `rate` requests go out back to back and break the server's sliding
    one-second window; spacing every request by 1/rate (plus a margin) never does.
    """

    def __init__(self, rate_per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_second
        self.interval = (1.0 + MARGIN) / rate_per_second
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


class Pacer:
    """Upload slots for every process on one ledger, at the pace learned from the account's answers."""

    def __init__(self, ledger: Ledger, ceiling: float, *, clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self.ceiling = ceiling
        self.clock = clock

    def current(self) -> Pace:
        return Pace.from_json(self.ledger.setting(PACE_KEY), self.ceiling)

    def _change(self, change: Callable[[Pace], tuple[Pace, Any]], *, durable: bool = False) -> Any:
        def apply(stored: Any) -> tuple[Any, Any]:
            pace, result = change(Pace.from_json(stored, self.ceiling))
            return dataclasses.replace(pace, ceiling=self.ceiling).to_json(), result

        return self.ledger.update_setting(PACE_KEY, apply, durable=durable)

    def wait_turn(self, stop: threading.Event) -> bool:
        """Wait, without taking a slot, until the next free one is near; False when stop was set first."""
        while not stop.is_set():
            wait = self.current().next_slot - LEAD_SECONDS - self.clock()
            if wait <= 0:
                return True
            stop.wait(min(wait, 1.0))
        return False

    def acquire(self, stop: threading.Event) -> float | None:
        """Take the next free slot, wait for it, and go; returns the slot, or None when stop was set first.

        A stopped wait gives its slot back. Going is recorded in the ledger, and nobody goes sooner than 1/rate
        after the last one went: a wait that overslept (a slow thread, a busy host) takes a new slot instead of
        squeezing the next request closer to its own.
        """
        while True:
            reserved: tuple[float, float] = self._change(self._reserve)
            slot, interval = reserved
            while (wait := slot - self.clock()) > 0:
                if stop.wait(wait):
                    self._change(functools.partial(self._give_back, slot=slot, interval=interval))
                    return None
            if self._change(self._go):
                return slot

    def _go(self, pace: Pace) -> tuple[Pace, bool]:
        now = self.clock()
        if pace.last_sent is not None and now - pace.last_sent < 1.0 / pace.rate:
            return pace, False
        return dataclasses.replace(pace, last_sent=now), True

    def _reserve(self, pace: Pace) -> tuple[Pace, tuple[float, float]]:
        slot = max(self.clock(), pace.next_slot)
        return dataclasses.replace(pace, next_slot=slot + pace.interval), (slot, pace.interval)

    @staticmethod
    def _give_back(pace: Pace, slot: float, interval: float) -> tuple[Pace, None]:
        if abs(pace.next_slot - (slot + interval)) < 1e-9:
            return dataclasses.replace(pace, next_slot=slot), None
        return pace, None

    def limited(self, retry_after: float | None) -> Pace:
        """A 0429: this pace is too fast. Fall back, and hold every upload for a slot (or Retry-After)."""
        pace: Pace = self._change(lambda current: self._slow_down(current, retry_after), durable=True)
        log.warning(
            "rate limited by the API: uploading more slowly",
            uploads_per_second=round(pace.rate, 4),
            seconds_between_uploads=round(pace.interval, 1),
        )
        return pace

    def _slow_down(self, pace: Pace, retry_after: float | None) -> tuple[Pace, Pace]:
        now = self.clock()
        # 0429s answering requests sent before the last slow-down say nothing new about this pace.
        if pace.limited_at is None or now - pace.limited_at > pace.interval:
            too_fast = pace.rate if pace.too_fast is None else min(pace.too_fast, pace.rate)
            good = pace.good if pace.good is not None and pace.good < too_fast else None
            rate = max(FLOOR_PER_SECOND, good if good is not None else pace.rate / 2)
            pace = dataclasses.replace(pace, rate=rate, good=good, too_fast=too_fast, limited_at=now)
        hold = max(pace.interval, retry_after or 0.0)
        pace = dataclasses.replace(pace, accepted_in_a_row=0, settled_for=0, next_slot=max(pace.next_slot, now + hold))
        return pace, pace

    def accepted(self) -> Pace:
        """An accepted upload; after a run of them, the pace is known to work and moves towards the limit."""
        before = self.current()
        pace: Pace = self._change(self._speed_up, durable=before.accepted_in_a_row + 1 >= GOOD_RUN)
        if pace.rate > before.rate:
            log.info("uploading faster", uploads_per_second=round(pace.rate, 4), ceiling=self.ceiling)
        return pace

    def _speed_up(self, pace: Pace) -> tuple[Pace, Pace]:
        in_a_row = pace.accepted_in_a_row + 1
        if in_a_row < GOOD_RUN:
            pace = dataclasses.replace(pace, accepted_in_a_row=in_a_row)
            return pace, pace
        good = max(pace.good or 0.0, pace.rate)
        rate, too_fast, settled_for = pace.rate, pace.too_fast, pace.settled_for
        if rate >= self.ceiling:
            rate = self.ceiling
        elif too_fast is None:
            rate = min(self.ceiling, rate * 2)
        elif too_fast / rate > CLOSE_ENOUGH:
            rate = min(self.ceiling, (rate + too_fast) / 2)
        else:
            settled_for += in_a_row
            if settled_for >= FORGET_AFTER:
                too_fast, settled_for = None, 0
        pace = dataclasses.replace(
            pace, rate=rate, good=good, too_fast=too_fast, accepted_in_a_row=0, settled_for=settled_for
        )
        return pace, pace


class Access(Enum):
    """What the gate says to an uploader: go, go as the one trial upload after a pause, or stop."""

    OPEN = "open"
    TRIAL = "trial"
    STOPPED = "stopped"


class Gate:
    """Whether uploads may go out now. The account's refusals, and the indexing window, pause every upload.

    The pause lives only in the ledger: `status` in another process shows it, `resume` lifts it, a restart
    honours it. When a pause is due to end, exactly one upload goes out first as the trial; the rest wait for
    its answer.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        account_check_seconds: float,
        key_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.account_check_seconds = account_check_seconds
        self.key_id = key_id
        self.clock = clock

    @property
    def pause(self) -> Pause | None:
        return self.ledger.pause()

    def wait_open(self, stop: threading.Event) -> Access:
        while not stop.is_set():
            verdict, wait = self.ledger.take_trial(self.clock(), self.account_check_seconds)
            if verdict == "open":
                return Access.OPEN
            if verdict == "trial":
                return Access.TRIAL
            stop.wait(min(max(wait, 0.05), 1.0))
        return Access.STOPPED

    def account_refused(self, outcome: Outcome) -> None:
        """The account refused an upload: pause them all, with why, until the next trial."""
        seconds = max(self.account_check_seconds, outcome.retry_after or 0.0)
        now = self.clock()
        earlier = self.ledger.pause()
        same = earlier is not None and earlier.kind == "account" and earlier.cause == outcome.cause
        pause = Pause(
            reason=outcome.reason,
            since=earlier.since if same and earlier is not None else now,
            until=now + seconds,
            kind="account",
            cause=outcome.cause,
            key_id=self.key_id,
        )
        self.ledger.set_pause(pause)
        log.error(
            "UPLOADS PAUSED: the account refused an upload; no file is marked failed for this",
            reason=pause.reason,
            next_check_in_seconds=round(seconds),
            first_refusal=not same,
        )

    def answered(self) -> None:
        """An upload got an answer about the file: whatever paused uploads is over."""
        was = self.ledger.clear_pause()
        if was is not None:
            log.warning("uploads resumed", paused_for=was.reason, paused_seconds=round(self.clock() - was.since))

    def end_trial(self) -> None:
        """The trial told nothing about the account (a network error, a rate limit): the next upload tries again."""
        self.ledger.end_trial(self.clock())

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
        until = now + min(max(frees_at - now, 1.0), 60.0)

        def hold(found: Any) -> tuple[Any, bool]:
            earlier = Pause.from_json(found) if found else None
            # An account or ledger pause says more, and ends only by its own trial or a person: it stays.
            if earlier is not None and earlier.kind != "indexing_window":
                return found, False
            first = earlier is None
            since = now if earlier is None else earlier.since
            held = Pause(reason=reason, since=since, until=until, kind="indexing_window")
            return dataclasses.asdict(held), first

        if self.ledger.update_setting("pause", hold):
            log.warning("uploads paused before the indexing cap", reason=reason)
        return True
