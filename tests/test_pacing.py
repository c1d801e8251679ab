"""How fast, and whether, to upload: the retry policy, the limiter, the pace learned from 0429s, and the gate."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from memories_ingest import api
from memories_ingest.api import Outcome
from memories_ingest.files import Version
from memories_ingest.ledger import Ledger, LedgerLock, Pause
from memories_ingest.pacing import GOOD_RUN, Access, Gate, Pacer, RateLimiter, RetryPolicy
from memories_ingest.samples import write_video
from memories_ingest.sandbox import Sandbox
from memories_ingest.schema import FLOOR_PER_SECOND, MARGIN
from memories_ingest.uploader import Client, SnapshotReader

from conftest import API_KEY, Pipeline, daemon_config, spawned, wait_until

Build = Callable[..., Pipeline]


class FakeClock:
    """Time that moves only when a waiter waits, so a schedule is checked exactly."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class ClockEvent(threading.Event):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.now += timeout or 0
        return self.is_set()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger(tmp_path / "ledger.db")
    yield opened
    opened.close()


def test_retry_policy_grows_to_its_cap_with_jitter() -> None:
    policy = RetryPolicy(base=5, factor=2, cap=60, jitter=0.2)
    assert policy.delay(1, rng=lambda: 0.5) == 5
    assert policy.delay(3, rng=lambda: 0.5) == 20
    assert policy.delay(50, rng=lambda: 0.5) == 60
    assert policy.delay(1, rng=lambda: 0.0) == pytest.approx(4)
    assert policy.delay(1, rng=lambda: 1.0) == pytest.approx(6)


def test_the_limiter_never_lets_two_requests_into_one_second() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, clock=clock)
    stop = ClockEvent(clock)
    times = []
    for _ in range(20):
        assert limiter.acquire(stop)
        times.append(clock.now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 1.0
    assert (times[-1] - times[0]) / 19 < 1.02


def test_a_stopped_limiter_wait_gives_its_slot_back() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, clock=clock)
    stop = threading.Event()
    assert limiter.acquire(stop)
    stop.set()
    assert not limiter.acquire(stop)
    # The slot the stopped wait had taken is the next one's: nobody waits two intervals for it.
    clock.now = limiter.interval
    assert limiter.acquire(ClockEvent(clock)) and clock.now == limiter.interval


def slots(pacer: Pacer, stop: threading.Event, count: int) -> list[float]:
    taken = [pacer.acquire(stop) for _ in range(count)]
    assert None not in taken
    return [slot for slot in taken if slot is not None]


def test_the_pace_starts_at_the_ceiling_and_spaces_every_slot(ledger: Ledger) -> None:
    clock = FakeClock(1000.0)
    pacer = Pacer(ledger, 4.0, clock=clock)
    taken = slots(pacer, ClockEvent(clock), 12)
    assert min(b - a for a, b in itertools.pairwise(taken)) >= (1 + MARGIN) / 4.0 - 1e-9
    assert pacer.current().rate == 4.0


def test_a_0429_falls_back_and_runs_of_accepted_uploads_climb_back_towards_the_limit(ledger: Ledger) -> None:
    clock = FakeClock(1000.0)
    pacer = Pacer(ledger, 1.0, clock=clock)
    first = pacer.limited(retry_after=None)
    assert (first.rate, first.too_fast) == (0.5, 1.0)
    assert first.next_slot >= clock.now + first.interval
    for _ in range(GOOD_RUN):
        pace = pacer.accepted()
    assert pace.rate == pytest.approx(0.75) and pace.good == 0.5
    clock.now += 10
    again = pacer.limited(retry_after=None)
    assert (again.rate, again.too_fast) == (0.5, 0.75), "back to the fastest pace known to work"
    for _ in range(GOOD_RUN * 2):
        pace = pacer.accepted()
    assert pace.rate == pytest.approx(0.625)
    assert pace.too_fast == 0.75 and pace.rate < pace.too_fast


def test_0429s_answering_requests_sent_before_a_slow_down_count_once(ledger: Ledger) -> None:
    clock = FakeClock(1000.0)
    pacer = Pacer(ledger, 1.0, clock=clock)
    pacer.limited(None)
    clock.now += 0.1
    assert pacer.limited(None).rate == 0.5


def test_the_pace_never_falls_below_the_floor_and_honours_retry_after(ledger: Ledger) -> None:
    clock = FakeClock(1000.0)
    pacer = Pacer(ledger, 1.0, clock=clock)
    for _ in range(20):
        clock.now += 1000
        pace = pacer.limited(retry_after=None)
    assert pace.rate == FLOOR_PER_SECOND
    held = pacer.limited(retry_after=3600)
    assert held.next_slot >= clock.now + 3600


def test_the_learned_pace_survives_a_restart_and_a_lower_ceiling_applies_at_once(tmp_path: Path) -> None:
    first = Ledger(tmp_path / "ledger.db")
    Pacer(first, 1.0).limited(None)
    first.close()
    reopened = Ledger(tmp_path / "ledger.db")
    assert Pacer(reopened, 1.0).current().rate == 0.5
    assert Pacer(reopened, 0.2).current().rate == 0.2
    reopened.close()


def test_a_stopped_wait_gives_its_slot_back(ledger: Ledger) -> None:
    clock = FakeClock(1000.0)
    pacer = Pacer(ledger, 1.0, clock=clock)
    assert pacer.acquire(threading.Event()) is not None
    before = pacer.current().next_slot
    stopped = threading.Event()
    stopped.set()
    assert pacer.acquire(stopped) is None
    assert pacer.current().next_slot == before


SLOT_TAKER = """
import json, sys, threading
from memories_ingest.ledger import Ledger
from memories_ingest.pacing import Pacer
ledger = Ledger(sys.argv[1])
pacer = Pacer(ledger, float(sys.argv[2]))
stop = threading.Event()
print(json.dumps([pacer.acquire(stop) for _ in range(int(sys.argv[3]))]))
"""


def test_processes_on_one_ledger_take_their_slots_from_one_schedule(tmp_path: Path) -> None:
    Ledger(tmp_path / "ledger.db").close()
    takers = [
        subprocess.Popen(
            [sys.executable, "-c", SLOT_TAKER, str(tmp_path / "ledger.db"), "10", "15"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    taken = sorted(slot for taker in takers for slot in json.loads(taker.communicate(timeout=60)[0]))
    assert len(taken) == 45
    assert min(b - a for a, b in itertools.pairwise(taken)) >= (1 + MARGIN) / 10 - 1e-6


def paused(ledger: Ledger, until: float, cause: str = "balance") -> None:
    ledger.set_pause(Pause(reason="no points", since=until - 600, until=until, kind="account", cause=cause))


def test_after_a_pause_exactly_one_upload_is_the_trial(ledger: Ledger) -> None:
    clock = FakeClock(1000.0)
    gates = [Gate(ledger, account_check_seconds=600, key_id="k", clock=clock) for _ in range(2)]
    paused(ledger, until=clock.now + 10)
    stop = ClockEvent(clock)
    assert gates[0].wait_open(stop) is Access.TRIAL
    pause = ledger.pause()
    assert pause is not None and pause.until == clock.now + 600, "the others wait for the trial's answer"
    gates[1].answered()
    assert ledger.pause() is None
    assert gates[1].wait_open(stop) is Access.OPEN


def test_a_trial_that_learns_nothing_hands_over_and_a_refusal_pauses_again(ledger: Ledger) -> None:
    clock = FakeClock(1000.0)
    gate = Gate(ledger, account_check_seconds=600, key_id="k", clock=clock)
    paused(ledger, until=clock.now)
    stop = ClockEvent(clock)
    assert gate.wait_open(stop) is Access.TRIAL
    gate.end_trial()
    assert gate.wait_open(stop) is Access.TRIAL
    refusal = Outcome("account", "HTTP 200, code 0402", cause="balance", advice="top it up")
    gate.account_refused(refusal)
    pause = ledger.pause()
    assert pause is not None and pause.cause == "balance" and pause.key_id == "k"
    assert pause.since == 400.0, "a pause that goes on keeps its start"


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "memories_ingest.cli", *args]


ENV = {**os.environ, "MEMORIES_API_KEY": API_KEY}


@pytest.mark.parametrize("dialect", api.DIALECTS)
def test_the_daemon_learns_a_slow_account_and_then_stays_under_it(
    tmp_path: Path, pipeline: Build, dialect: str
) -> None:
    with Sandbox(api_key=API_KEY, dialect=dialect, rate_per_second=0.25, parse_seconds=0.2) as slow:
        run = pipeline(api={"base_url": slow.url}, upload={"rate_per_second": 1})
        names = [f"clip{n:02}.mp4" for n in range(16)]
        for n, name in enumerate(names):
            write_video(tmp_path / "watched" / name, seconds=1 + n / 10)
        run.start()
        wait_until(lambda: run.ledger.counts()["uploaded"] == 16, 240, "16 uploads at one every 4 s")
        requests = slow.requests()
        received = [video.filename for video in slow.received()]
    assert sorted(received) == names
    limited = [r.arrived_at for r in requests if r.code in ("0429", "429")]
    half = (requests[0].arrived_at + requests[-1].arrived_at) / 2
    assert len([t for t in limited if t >= half]) <= 2, limited
    assert run.ledger.setting("pace")["rate"] <= 0.25


def test_upload_beside_a_running_daemon_shares_its_pace(tmp_path: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=1, parse_seconds=0.2) as sandbox:
        config = daemon_config(tmp_path, sandbox, upload={"rate_per_second": 1})
        for n in range(4):
            write_video(tmp_path / "watched" / f"daemon{n}.mp4", seconds=1 + n / 10)
        by_hand = [write_video(tmp_path / f"hand{n}.mp4", seconds=2 + n / 10) for n in range(3)]
        daemon = spawned(
            subprocess.Popen(command("run", "-c", str(config)), env=ENV, stderr=subprocess.PIPE, text=True)
        )
        wait_until(lambda: len(sandbox.received()) >= 1, 30, "the daemon's first upload")
        uploaded = subprocess.run(
            command("upload", "-c", str(config), *map(str, by_hand)), env=ENV, capture_output=True, text=True
        )
        assert uploaded.returncode == 0, uploaded.stderr
        wait_until(lambda: len(sandbox.received()) == 7, 60, "all seven uploads")
        daemon.terminate()
        daemon.communicate(timeout=30)
        codes = [record.code for record in sandbox.requests()]
    assert codes == ["0000"] * 7


def test_a_second_daemon_on_the_same_ledger_is_refused(tmp_path: Path, sandbox: Sandbox) -> None:
    config = daemon_config(tmp_path, sandbox)
    first = spawned(subprocess.Popen(command("run", "-c", str(config)), env=ENV, stderr=subprocess.PIPE, text=True))
    wait_until(lambda: (tmp_path / "ledger.db.lock").exists() and first.poll() is None, 30, "the first daemon")
    wait_until(lambda: _held(tmp_path), 30, "the first daemon to hold the ledger")
    second = subprocess.run(command("run", "-c", str(config)), env=ENV, capture_output=True, text=True, timeout=60)
    assert second.returncode == 73
    assert f"pid {first.pid}" in second.stderr
    video = write_video(tmp_path / "watched" / "after.mp4")
    wait_until(lambda: [v.filename for v in sandbox.received()] == [video.name], 30, "the first daemon still at work")
    first.terminate()
    first.communicate(timeout=30)
    assert first.returncode == 0


def _held(tmp_path: Path) -> bool:
    return LedgerLock.holder(tmp_path / "ledger.db") is not None


def test_requests_reach_the_server_no_closer_than_the_pace_while_the_host_is_busy(tmp_path: Path) -> None:
    """The slot is taken once the connection is open, just before the request line: what the server sees.

    Threads that compete for the interpreter (as the settler does while it probes a burst) must not squeeze
    two arrivals closer than 1/rate. The full proof, 1,000 requests at 1/s, is in bench/ (pacing).
    """
    requests_to_send, rate = 20, 1.0
    path = tmp_path / "v.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(64 * 1024))
    ledger = Ledger(tmp_path / "ledger.db")
    pacer = Pacer(ledger, rate)
    stop, busy = threading.Event(), threading.Event()

    def take(stop: threading.Event) -> None:
        assert pacer.acquire(stop) is not None

    def hog() -> None:
        block = os.urandom(1 << 20)
        while not busy.is_set():
            hashlib.sha256(block).digest()

    hogs = [threading.Thread(target=hog, daemon=True) for _ in range(3)]
    for thread in hogs:
        thread.start()
    with Sandbox(api_key=API_KEY, rate_per_second=rate) as sandbox:
        client = Client(sandbox.url, API_KEY)
        try:
            for _ in range(requests_to_send):
                fd = os.open(path, os.O_RDONLY)
                try:
                    reader = SnapshotReader(fd, os.fstat(fd), str(path), stop)
                    outcome = client.upload(reader, "v.mp4", "video/mp4", [], before_send=lambda: take(stop))
                finally:
                    os.close(fd)
                assert outcome.kind == "uploaded", outcome
        finally:
            busy.set()
            client.close()
            ledger.close()
        arrivals = [record.arrived_at for record in sandbox.requests()]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == requests_to_send
    assert min(gaps) >= 1 / rate, f"two requests {min(gaps):.4f} s apart"


def test_the_indexing_window_never_replaces_an_account_pause(ledger: Ledger) -> None:
    clock = FakeClock(1000.0)
    gate = Gate(ledger, account_check_seconds=600, key_id="k", clock=clock)
    for number in range(2):
        ledger.record_seen(Path(f"/v/{number}.mp4"), Path("/v"), "s", Version(1, 1, number, 1))
        row = ledger.get(Path(f"/v/{number}.mp4"))
        assert row is not None and ledger.mark_queued(row, f"fp{number}", {})
        claimed = ledger.claim([Path("/v")])
        assert claimed is not None
        ledger.mark_uploaded(claimed, f"VI{number}")
    paused(ledger, until=clock.now + 600)
    assert gate.indexing_window_full(2)
    pause = ledger.pause()
    assert pause is not None and pause.kind == "account" and pause.until == clock.now + 600


class Oversleeping(threading.Event):
    """A wait that comes back late by `late` seconds the first time: a thread the host was slow to wake."""

    def __init__(self, clock: FakeClock, late: float) -> None:
        super().__init__()
        self.clock, self.late = clock, late

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.now += (timeout or 0) + self.late
        self.late = 0.0
        return False


def test_a_process_that_went_late_pushes_the_next_one_back(tmp_path: Path) -> None:
    """A reserved slot 1000, B slot 1001; A wakes at 1001.6 and goes. B must not go at 1001.6 too."""
    ledger = Ledger(tmp_path / "ledger.db")
    clock = FakeClock(1000.0)
    first, second = Pacer(ledger, 1.0, clock=clock), Pacer(ledger, 1.0, clock=clock)
    assert first.acquire(ClockEvent(clock)) == 1000.0  # the slot before: the schedule now says 1001.015
    late = Oversleeping(clock, late=0.6)
    went_late = first.acquire(late)
    assert went_late is not None and clock.now == pytest.approx(1001.615)
    assert second.acquire(ClockEvent(clock)) is not None
    assert clock.now - 1001.615 >= 1.0, "the next one goes a whole interval after the late one"
    ledger.close()
