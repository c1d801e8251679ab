"""What people are shown: one status document, and its words, for `status`, the status page and systemd.

`status` runs in a process of its own, often while no daemon runs at all, so everything here comes from the
ledger: what the rows say, what the daemon publishes there every few seconds (its pid, its heartbeat, its
folders and how each is watched), and whether a daemon holds the ledger now.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from .ledger import Ledger, LedgerLock, Row
from .schema import Pace
from .states import DELIVERED, FAILED, INDEX_FAILED, PENDING, QUEUED, REJECTED, RETRYING, UNCERTAIN

# What the daemon publishes for `status`, and how often; a heartbeat older than a few of these is a stalled daemon.
DAEMON_KEY = "daemon"
PUBLISH_SECONDS = 5.0
REJECTED_RELOAD_KEY = "rejected_reload"
# Rows whose error says why the file will not go up as it is: refused, or failed for good.
PROBLEM_STATES = (REJECTED, FAILED, INDEX_FAILED)
# Rows whose error is a note on a file that is still on its way: a retry, a doubt, a shutdown.
NOTICE_STATES = (QUEUED, RETRYING, UNCERTAIN, PENDING)

# C0 and C1 controls (escape sequences start with either), and the marks that reorder text on screen.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(value: object) -> str:
    """Text safe for a terminal or a page: a file name's bytes that are not UTF-8, and every control, as \\xNN.

    File names come from whoever can write to a watched folder; one named with an escape sequence must not
    move a cursor or recolour a terminal that runs `status`.
    """
    text = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _UNSAFE.sub(
        lambda match: f"\\x{ord(match[0]):02x}" if ord(match[0]) < 0x100 else f"\\u{ord(match[0]):04x}", text
    )


def status(ledger: Ledger, now: float | None = None) -> dict[str, Any]:
    """Everything `status` shows, read from the ledger in one consistent view."""
    now = time.time() if now is None else now
    with ledger.reading():
        counts = ledger.counts()
        pause = ledger.pause()
        pace = ledger.setting("pace")
        published = ledger.setting(DAEMON_KEY) or {}
        rejected_reload = ledger.setting(REJECTED_RELOAD_KEY)
        uploading = ledger.rows("uploading")
        settling = ledger.settling()
        next_retry = ledger.next_retry()
        problems = ledger.recent_with_error(PROBLEM_STATES)
        notices = ledger.recent_with_error(NOTICE_STATES)
    holder = LedgerLock.holder(ledger.path)
    settle_seconds = float(published.get("settle_seconds", 0.0))
    return {
        "daemon": _daemon(holder, published, now),
        "counts": counts,
        "ignored": published.get("ignored"),
        "folders": published.get("folders", []) if holder else [],
        "next_rescan": published.get("next_rescan") if holder else None,
        "settling": {
            "count": counts[PENDING],
            "files": [
                {
                    "path": str(row.path),
                    "check_at": max(row.stable_since + settle_seconds, row.next_attempt_at or 0.0),
                    "error": row.error,
                }
                for row in settling
            ],
        },
        "uploading": [_in_flight(row, now) for row in uploading],
        "paused": None if pause is None else {**dataclasses.asdict(pause), "how_to_lift": _how_to_lift(pause.kind)},
        # Before the first upload the pace is the daemon's ceiling, which it publishes.
        "pace": pace or _ceiling(published) if holder else pace,
        "next_retry": None
        if next_retry is None
        else {"path": str(next_retry.path), "at": next_retry.next_attempt_at, "error": next_retry.error},
        "rejected_reload": rejected_reload,
        "problems": [_noted(row) for row in problems],
        "notices": [_noted(row) for row in notices],
    }


def _daemon(holder: Any, published: Mapping[str, Any], now: float) -> dict[str, Any]:
    if holder is None:
        return {"running": False, "last_heartbeat": published.get("heartbeat")}
    heartbeat = published.get("heartbeat") if published.get("pid") == holder.pid else None
    return {
        "running": True,
        "pid": holder.pid,
        "since": holder.since,
        "last_heartbeat": heartbeat,
        "heartbeat_age_seconds": None if heartbeat is None else round(max(0.0, now - heartbeat), 1),
    }


def _ceiling(published: Mapping[str, Any]) -> dict[str, float] | None:
    ceiling = published.get("ceiling")
    return None if ceiling is None else {"rate": ceiling, "ceiling": ceiling}


def _how_to_lift(kind: str) -> str:
    if kind == "account":
        return "it lifts by itself after the next trial upload that is accepted; `memories-ingest resume` tries now"
    if kind == "ledger":
        return "run `memories-ingest rebuild` to recover what was delivered, or `memories-ingest resume` to upload all"
    return "it lifts by itself; `memories-ingest resume` lifts it now"


def _in_flight(row: Row, now: float) -> dict[str, Any]:
    sent = row.bytes_sent or 0
    elapsed = now - row.started_at if row.started_at else 0.0
    speed = sent / elapsed if elapsed > 0 else 0.0
    return {
        "path": str(row.path),
        "unique_id": row.unique_id,
        "attempt": row.attempts,
        "bytes_sent": sent,
        "size": row.size,
        "percent": round(100 * sent / row.size, 1) if row.size else 100.0,
        "bytes_per_second": round(speed),
        "eta_seconds": round((row.size - sent) / speed, 1) if speed > 0 else None,
    }


def _noted(row: Row) -> dict[str, Any]:
    return {"path": str(row.path), "state": row.state, "error": row.error, "at": row.updated_at}


# -- words --------------------------------------------------------------------------------------------------


def size(count: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    unit = 0
    while count >= 1024 and unit < len(units) - 1:
        count /= 1024
        unit += 1
    return f"{count:.0f} B" if unit == 0 else f"{count:.1f} {units[unit]}"


def bar(percent: float, width: int = 24) -> str:
    filled = round(width * min(max(percent, 0.0), 100.0) / 100)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def clock(timestamp: float | None, now: float | None = None) -> str:
    """A time of day; with the date when it is not today."""
    if not timestamp:
        return "-"
    when = datetime.fromtimestamp(timestamp)
    today = datetime.fromtimestamp(time.time() if now is None else now).date()
    return when.strftime("%H:%M:%S" if when.date() == today else "%Y-%m-%d %H:%M")


def describe_pace(document: Mapping[str, Any]) -> str | None:
    pace = Pace.stored(document.get("pace"))
    return None if pace is None else pace.describe()


def render(document: Mapping[str, Any], now: float | None = None) -> str:
    """The status document in words, for a terminal: what `status` prints and `status --watch` redraws."""
    now = time.time() if now is None else now
    lines = [_daemon_line(document["daemon"], now)]
    if document.get("rejected_reload"):
        rejected = document["rejected_reload"]
        lines.append(
            f"the config on disk was REJECTED at {clock(rejected['at'], now)}; the daemon runs the one it had:"
        )
        lines.extend(f"  {printable(problem)}" for problem in rejected["problems"])
    counts = "  ".join(f"{state}: {n}" for state, n in document["counts"].items() if n)
    lines.append(counts or "the ledger is empty")
    if document.get("ignored"):
        lines.append(f"ignored: {document['ignored']} file(s) without a video extension, at the last scan")
    for folder in document["folders"]:
        lines.append(
            f"watching {printable(folder['path'])} ({folder.get('unique_id') or 'no unique_id'}): "
            f"{folder['mode']}, {printable(folder['why'])}"
        )
    if document.get("next_rescan"):
        lines.append(f"next rescan: {clock(document['next_rescan'], now)}")
    settling = document["settling"]
    if settling["count"]:
        first = settling["files"][0]
        lines.append(
            f"settling: {settling['count']} file(s); next checked at {clock(first['check_at'], now)}: "
            f"{printable(first['path'])}" + (f" ({printable(first['error'])})" if first["error"] else "")
        )
    for upload in document["uploading"]:
        eta = f"ETA {upload['eta_seconds']:.0f} s" if upload["eta_seconds"] is not None else "ETA -"
        lines.append(
            f"uploading {printable(upload['path'])} (attempt {upload['attempt']})\n"
            f"  {bar(upload['percent'])} {upload['percent']:5.1f}%  {size(upload['bytes_sent'])} of "
            f"{size(upload['size'])}  {size(upload['bytes_per_second'])}/s  {eta}"
        )
    paused = document["paused"]
    if paused:
        until = f"next trial {clock(paused['until'], now)}" if paused["until"] else "until a person lifts it"
        lines.append(f"PAUSED since {clock(paused['since'], now)}, {until}: {printable(paused['reason'])}")
        lines.append(f"  to lift it: {paused['how_to_lift']}")
    pace = describe_pace(document)
    if pace is not None:
        lines.append(f"pace: {pace}")
    retry = document["next_retry"]
    if retry:
        lines.append(
            f"next retry: {printable(retry['path'])} at {clock(retry['at'], now)} ({printable(retry['error'])})"
        )
    for heading, noted in (("rejected or failed:", document["problems"]), ("notices:", document["notices"])):
        if noted:
            lines.append(heading)
            lines.extend(
                f"  {clock(e['at'], now)} {e['state']:<12} {printable(e['path'])}: {printable(e['error'])}"
                for e in noted
            )
    return "\n".join(lines)


def _daemon_line(daemon: Mapping[str, Any], now: float) -> str:
    if not daemon["running"]:
        seen = daemon.get("last_heartbeat")
        return "no daemon is running on this ledger" + (f" (last seen {clock(seen, now)})" if seen else "")
    age = daemon.get("heartbeat_age_seconds")
    beat = "no heartbeat yet" if age is None else f"last heartbeat {age:.0f} s ago"
    return f"daemon running: pid {daemon['pid']}, since {clock(daemon['since'], now)}, {beat}"


def status_line(document: Mapping[str, Any], folders: int, problems: Sequence[str] = ()) -> str:
    """One line for `systemctl status`: what is watched, queued, moving and wrong."""
    counts = document["counts"]
    work = [f"{counts[QUEUED]} queued"]
    if counts[PENDING]:
        work.insert(0, f"{counts[PENDING]} settling")
    uploading = document["uploading"]
    if uploading:
        percents = ", ".join(f"{upload['percent']:.0f}%" for upload in uploading)
        work.append(f"{len(uploading)} uploading ({percents})")
    if counts[RETRYING]:
        work.append(f"{counts[RETRYING]} retrying")
    if counts.get(UNCERTAIN):
        work.append(f"{counts[UNCERTAIN]} uncertain")
    work.append(f"{sum(counts[state] for state in DELIVERED)} uploaded")
    work += [f"{counts[state]} {state}" for state in (FAILED, REJECTED) if counts[state]]
    parts = [f"watching {folders} folder{'' if folders == 1 else 's'}", ", ".join(work)]
    if document["paused"]:
        parts.append(f"paused: {document['paused']['reason']}")
    if document.get("rejected_reload"):
        parts.append("the config on disk was rejected")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        parts.append(f"unhealthy: {problems[0]}{more}")
    return printable("; ".join(parts))


class ProgressBar:
    """One line on a terminal, redrawn in place: the file, its bar, the bytes sent of the total, the speed, the ETA.

    A log line ends the bar first (see cli.configure_logging), so the two never share a line.
    """

    active: ProgressBar | None = None

    def __init__(self, name: str, size: int, stream: TextIO = sys.stderr) -> None:
        self.name = printable(name)
        self.size = size
        self.stream = stream
        self.started = time.monotonic()

    def __call__(self, sent: int) -> None:
        if not self.stream.isatty():
            return
        percent = 100 * sent / self.size if self.size else 100.0
        elapsed = max(time.monotonic() - self.started, 1e-6)
        speed = sent / elapsed
        eta = f"ETA {(self.size - sent) / speed:.0f} s" if speed > 0 and sent < self.size else "ETA -"
        # \x1b[K clears what a longer line drawn before left at its end.
        self.stream.write(
            f"\r{self.name} {bar(percent)} {percent:5.1f}%  {size(sent)} of {size(self.size)}"
            f"  {size(speed)}/s  {eta}\x1b[K"
        )
        self.stream.flush()
        ProgressBar.active = self

    def end(self) -> None:
        """Leave the bar's line, so that what is written next starts on a line of its own."""
        if ProgressBar.active is self:
            self.stream.write("\n")
            self.stream.flush()
            ProgressBar.active = None
