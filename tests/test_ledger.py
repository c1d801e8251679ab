"""The ledger: states, claims, changed files, restarts, and readers in other processes."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from memories_ingest.custody import location_problem, process_alive, this_process
from memories_ingest.files import Version
from memories_ingest.ledger import Ledger, LedgerError, LedgerLocationError, Pause
from memories_ingest.states import FAILED, GONE, PENDING, QUEUED, REJECTED, RETRYING, UPLOADED, UPLOADING


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock) -> Ledger:
    return Ledger(tmp_path / "ledger.db", clock=clock)


FOLDER = Path("/videos")


def seen(ledger: Ledger, name: str, size: int = 100, mtime_ns: int = 1, inode: int = 7, ctime_ns: int = 1) -> bool:
    return ledger.record_seen(FOLDER / name, FOLDER, "scope", Version(size, mtime_ns, inode, ctime_ns))


def queue(ledger: Ledger, name: str, fingerprint: str = "fp") -> None:
    row = ledger.get(FOLDER / name)
    assert row is not None
    assert ledger.mark_queued(row, fingerprint, {"video_codec": "h264"})


def deliver(ledger: Ledger, name: str, fingerprint: str, video_no: str = "VI1") -> None:
    """Take a file through queue and claim to `uploaded`, as the upload worker does."""
    seen(ledger, name)
    queue(ledger, name, fingerprint)
    row = ledger.claim([FOLDER])
    assert row is not None
    ledger.mark_uploaded(row, video_no)


def test_wal_mode_and_full_sync(ledger: Ledger) -> None:
    assert ledger._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_a_new_file_is_pending_and_seeing_it_unchanged_does_nothing(ledger: Ledger) -> None:
    assert seen(ledger, "a.mp4")
    assert not seen(ledger, "a.mp4")
    row = ledger.get(FOLDER / "a.mp4")
    assert row is not None and row.state == PENDING and row.unique_id == "scope"


def test_claim_takes_each_due_row_once_and_counts_the_attempt(ledger: Ledger, clock: Clock) -> None:
    for name in ("a.mp4", "b.mp4"):
        seen(ledger, name)
        queue(ledger, name)
    first = ledger.claim([FOLDER])
    second = ledger.claim([FOLDER])
    assert first is not None and second is not None and first.id != second.id
    assert first.state == UPLOADING and first.attempts == 1
    assert ledger.claim([FOLDER]) is None
    ledger.mark_retry(first.id, clock.now + 60, "HTTP 503")
    assert ledger.claim([FOLDER]) is None
    clock.now += 61
    again = ledger.claim([FOLDER])
    assert again is not None and again.id == first.id and again.attempts == 2
    assert ledger.claim([Path("/elsewhere")]) is None


def test_concurrent_claims_from_threads_never_share_a_row(ledger: Ledger) -> None:
    for n in range(40):
        seen(ledger, f"{n}.mp4", inode=n)
        queue(ledger, f"{n}.mp4")
    claimed: list[int] = []
    lock = threading.Lock()

    def claim_all() -> None:
        other = Ledger(ledger.path, clock=ledger.clock)
        while (row := other.claim([FOLDER])) is not None:
            with lock:
                claimed.append(row.id)
        other.close()

    threads = [threading.Thread(target=claim_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 40


CLAIM_AND_DIE = """
import sys
from pathlib import Path
from memories_ingest.ledger import Ledger
assert Ledger(sys.argv[1]).claim([Path(sys.argv[2])]) is not None
"""


def test_only_the_uploads_of_processes_that_died_go_back_to_the_queue(ledger: Ledger) -> None:
    for name in ("mine.mp4", "theirs.mp4"):
        seen(ledger, name)
        queue(ledger, name)
    assert ledger.claim([FOLDER]) is not None
    # Another process claims the other row, then dies without a word, as an `upload` in a dropped SSH session.
    subprocess.run([sys.executable, "-c", CLAIM_AND_DIE, str(ledger.path), str(FOLDER)], check=True)
    assert ledger.requeue_orphans() == 1
    mine, theirs = (ledger.get(FOLDER / name) for name in ("mine.mp4", "theirs.mp4"))
    assert mine is not None and mine.state == UPLOADING, "a live process's upload is left alone"
    assert theirs is not None and theirs.state == QUEUED and theirs.attempts == 1
    assert process_alive(this_process()) and not process_alive("999999999:1")


def test_an_uploaded_file_touched_but_unchanged_keeps_its_video(ledger: Ledger) -> None:
    deliver(ledger, "a.mp4", "same")
    assert seen(ledger, "a.mp4", mtime_ns=2)
    touched = ledger.get(FOLDER / "a.mp4")
    assert touched is not None and touched.state == PENDING and touched.prior_state == UPLOADED
    original = ledger.delivered_copy(touched, "same")
    assert original is not None
    ledger.mark_duplicate(touched, "same", original)
    after = ledger.get(FOLDER / "a.mp4")
    assert after is not None and after.state == UPLOADED and after.video_no == "VI1"


def test_new_content_at_an_uploaded_path_is_a_new_video(ledger: Ledger) -> None:
    deliver(ledger, "a.mp4", "old")
    seen(ledger, "a.mp4", size=200, mtime_ns=2)
    changed = ledger.get(FOLDER / "a.mp4")
    assert changed is not None
    assert ledger.delivered_copy(changed, "new") is None
    queue(ledger, "a.mp4", "new")
    requeued = ledger.get(FOLDER / "a.mp4")
    assert requeued is not None and requeued.state == QUEUED and requeued.video_no is None
    history = ledger._conn.execute("SELECT video_no FROM uploads ORDER BY id").fetchall()
    assert [h["video_no"] for h in history] == ["VI1"]


def test_a_copy_of_delivered_content_in_the_same_scope_is_not_sent_again(ledger: Ledger) -> None:
    deliver(ledger, "a.mp4", "fp")
    seen(ledger, "copy.mp4", inode=8)
    copy = ledger.get(FOLDER / "copy.mp4")
    assert copy is not None
    original = ledger.delivered_copy(copy, "fp")
    assert original is not None and original.video_no == "VI1"


def test_a_queued_row_that_changes_is_not_queued_with_stale_checks(ledger: Ledger) -> None:
    seen(ledger, "a.mp4")
    stale = ledger.get(FOLDER / "a.mp4")
    assert stale is not None
    seen(ledger, "a.mp4", size=300)
    assert not ledger.mark_queued(stale, "fp", {})


def test_rejected_rows_are_rechecked_only_when_the_file_changes(ledger: Ledger) -> None:
    seen(ledger, "a.mp4")
    row = ledger.get(FOLDER / "a.mp4")
    assert row is not None
    ledger.mark_rejected(row.id, "video codec mpeg4 is not one of h264, hevc, vp9")
    assert not seen(ledger, "a.mp4")
    assert seen(ledger, "a.mp4", size=5)


def test_retry_puts_failed_rows_back(ledger: Ledger) -> None:
    for name in ("a.mp4", "b.mp4"):
        seen(ledger, name)
        queue(ledger, name)
        row = ledger.claim([FOLDER])
        assert row is not None
        ledger.mark_failed(row.id, "bad field")
    seen(ledger, "c.mp4")
    assert ledger.retry([FOLDER / "a.mp4", FOLDER / "c.mp4", FOLDER / "none.mp4"]) == [
        (FOLDER / "a.mp4", "back in the queue (it was failed)"),
        (FOLDER / "c.mp4", "on its way already (pending): nothing to do"),
        (FOLDER / "none.mp4", "not in the ledger: the daemon has never seen it"),
    ]
    assert ledger.counts()[FAILED] == 1
    assert ledger.retry_state(FAILED) == 1
    assert ledger.counts()[PENDING] == 3


def test_due_count_ignores_future_retries(ledger: Ledger, clock: Clock) -> None:
    seen(ledger, "a.mp4")
    assert ledger.due_count([FOLDER]) == 1
    queue(ledger, "a.mp4")
    row = ledger.claim([FOLDER])
    assert row is not None
    ledger.mark_retry(row.id, clock.now + 30, "timeout")
    assert ledger.counts()[RETRYING] == 1
    assert ledger.due_count([FOLDER]) == 0
    clock.now += 31
    assert ledger.due_count([FOLDER]) == 1


def test_a_non_utf8_file_name_is_kept_exactly(ledger: Ledger, tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9.mp4"
    path = Path(os.fsdecode(raw))
    assert ledger.record_seen(path, tmp_path, None, Version(1, 1, 1, 1))
    row = ledger.get(path)
    assert row is not None and os.fsencode(row.path) == raw


def test_gone_rows_come_back_when_the_file_reappears(ledger: Ledger) -> None:
    seen(ledger, "a.mp4")
    row = ledger.get(FOLDER / "a.mp4")
    assert row is not None
    ledger.mark_gone(row.id)
    assert ledger.counts()[GONE] == 1
    assert seen(ledger, "a.mp4")
    assert ledger.counts()[PENDING] == 1


def test_the_pause_is_shared_through_the_ledger(ledger: Ledger) -> None:
    pause = Pause(reason="insufficient balance", since=1.0, until=2.0, kind="account")
    ledger.set_pause(pause)
    assert Ledger(ledger.path).pause() == pause
    ledger.set_pause(None)
    assert ledger.pause() is None


def test_another_process_reads_while_this_one_writes(ledger: Ledger) -> None:
    writing = threading.Event()
    done = threading.Event()

    def write_rows() -> None:
        n = 0
        while not done.is_set():
            seen(ledger, f"{n}.mp4", inode=n)
            n += 1
            writing.set()

    writer = threading.Thread(target=write_rows)
    writer.start()
    writing.wait()
    try:
        code = (
            "import sys; from memories_ingest.ledger import Ledger;"
            "l = Ledger(sys.argv[1]); [l.counts() for _ in range(50)]; print(sum(l.counts().values()))"
        )
        result = subprocess.run([sys.executable, "-c", code, str(ledger.path)], capture_output=True, text=True)
    finally:
        done.set()
        writer.join()
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0


def test_a_ledger_is_made_only_where_it_can_be_and_only_when_asked(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="there is no ledger"):
        Ledger(tmp_path / "missing" / "ledger.db", create=False)
    assert not (tmp_path / "missing").exists()
    Ledger(tmp_path / "missing" / "ledger.db").close()
    assert (tmp_path / "missing" / "ledger.db").is_file()
    (tmp_path / "file").write_text("")
    with pytest.raises(LedgerLocationError, match="is not a directory"):
        Ledger(tmp_path / "file" / "ledger.db")
    assert location_problem(tmp_path / "file" / "ledger.db") is not None
    assert location_problem(Path("/proc/ledger.db")) is not None
    assert location_problem(tmp_path / "new" / "ledger.db") is None


def test_integrity_after_heavy_use(ledger: Ledger) -> None:
    for n in range(200):
        seen(ledger, f"{n}.mp4", inode=n)
    conn = sqlite3.connect(ledger.path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert REJECTED not in ledger.counts() or ledger.counts()[REJECTED] == 0


def test_a_file_touched_after_an_unanswered_send_still_counts_as_in_doubt(ledger: Ledger) -> None:
    for day in ("day1", "day2"):
        path = FOLDER / day / "clip.mp4"
        ledger.record_seen(path, FOLDER, "scope", Version(100, 1, hash(day) % 1000, 1))
        row = ledger.get(path)
        assert row is not None and ledger.mark_queued(row, f"fp-{day}", {})
        claimed = ledger.claim([FOLDER])
        assert claimed is not None
        ledger.mark_sent(claimed.id)
        ledger.mark_retry(claimed.id, 0.0, "timed out")
    touched = ledger.get(FOLDER / "day1" / "clip.mp4")
    assert touched is not None and touched.state == "uncertain"
    # A chmod: the file settles again, is the same content, and is queued with its send still in doubt.
    ledger.record_seen(touched.path, FOLDER, "scope", Version(100, 1, touched.inode, 2))
    pending = ledger.get(touched.path)
    assert pending is not None and ledger.mark_queued(pending, "fp-day1", {})
    requeued = ledger.get(touched.path)
    other = ledger.get(FOLDER / "day2" / "clip.mp4")
    assert requeued is not None and requeued.state == QUEUED and requeued.sent_at is not None
    assert other is not None and ledger.others_in_doubt(other)


def delivered_many(ledger: Ledger, count: int) -> None:
    """count rows already uploaded in one folder, the state of a NAS share after a year: made in one statement."""
    seen(ledger, "template.mp4")
    with ledger._write() as conn:
        conn.execute(
            "WITH RECURSIVE n(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM n WHERE value < ?)"
            " INSERT INTO files (path, folder, unique_id, state, size, mtime_ns, inode, ctime_ns, stable_since,"
            " attempts, video_no, fingerprint, created_at, updated_at, uploaded_at)"
            " SELECT CAST(CAST(path AS TEXT) || '.' || value AS BLOB), folder, unique_id, 'uploaded', size, mtime_ns,"
            " inode + value, ctime_ns, stable_since, 1, 'VI' || value, 'fp' || value, created_at, updated_at,"
            " updated_at FROM files, n WHERE path = ?",
            [count, os.fsencode(FOLDER / "template.mp4")],
        )


def sqlite_steps(ledger: Ledger, action: Callable[[], object]) -> int:
    """How many thousand virtual-machine steps SQLite takes for action: its work, whatever the machine's speed."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    ledger._conn.set_progress_handler(count, 1000)
    try:
        action()
    finally:
        ledger._conn.set_progress_handler(None, 0)
    return steps


def test_what_an_idle_daemon_asks_often_does_not_read_every_delivered_row(ledger: Ledger) -> None:
    delivered_many(ledger, 20_000)
    assert ledger.counts()[UPLOADED] == 20_000
    whole_table = sqlite_steps(ledger, lambda: ledger.rows(UPLOADED))
    # Each uploader claims twice a second, the settler looks for pending rows every second, and so on.
    for ask in (
        lambda: ledger.claim([FOLDER]),
        lambda: ledger.due_count([FOLDER]),
        ledger.pending,
        ledger.due_action,
        ledger.requeue_orphans,
    ):
        assert sqlite_steps(ledger, ask) * 100 < whole_table


def test_a_verdict_on_a_row_another_process_moved_on_meanwhile_leaves_it_alone(ledger: Ledger) -> None:
    seen(ledger, "a.mp4")
    queue(ledger, "a.mp4")
    # The settler saw the row pending; meanwhile `upload` in another process queued and claimed it.
    assert ledger.claim([FOLDER]) is not None
    row = ledger.get(FOLDER / "a.mp4")
    assert row is not None
    ledger.mark_rejected(row.id, "probed too late", only_from=(PENDING,))
    ledger.mark_gone(row.id, only_from=(PENDING,))
    after = ledger.get(FOLDER / "a.mp4")
    assert after is not None and after.state == UPLOADING and after.error is None
