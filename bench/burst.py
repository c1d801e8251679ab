"""Burst: a thousand files dropped at once, every one recorded, then uploaded at the account's rate and no faster."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from memories_ingest import samples
from memories_ingest.ledger import Ledger
from memories_ingest.sandbox import RequestRecord, Sandbox
from memories_ingest.schema import PACE_KEY

from .measure import Mark, Proc, Usage, log_time, med
from .report import Row, listing, met, mib, per_second, ratio, say, seconds
from .rig import KEY, Context, child_env, daemon_argv, padded_copies, write_config

BURST_RATE = 20.0


def requeue(ledger_path: Path, count: int) -> int:
    """Put the first count uploaded rows back in the queue, as if validated and never sent, and forget the pace."""
    db = sqlite3.connect(ledger_path, isolation_level=None)
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(files)")}
        extra = "".join(f", {name} = NULL" for name in ("sent_at", "bytes_sent", "started_at") if name in columns)
        db.execute("BEGIN IMMEDIATE")
        changed = db.execute(
            "UPDATE files SET state = 'queued', video_no = NULL, uploaded_at = NULL, attempts = 0, error = NULL,"
            f" next_attempt_at = ?{extra} WHERE id IN"
            " (SELECT id FROM files WHERE state = 'uploaded' ORDER BY id LIMIT ?)",
            [time.time(), count],
        ).rowcount
        # A restarted daemon paces by what the ledger learned; this run measures the pipeline at R, whatever
        # the dropped run learned.
        db.execute("DELETE FROM settings WHERE key = ?", [PACE_KEY])
        db.execute("COMMIT")
        return changed
    finally:
        db.close()


def upload_rate(requests: list[RequestRecord]) -> tuple[float, int, int]:
    """Accepted requests per second from the first to the last accepted one; 0429 count; request count."""
    ok = [r for r in requests if r.code == "0000"]
    limited = sum(1 for r in requests if r.code == "0429")
    achieved = (len(ok) - 1) / (ok[-1].arrived_at - ok[0].arrived_at) if len(ok) > 1 else 0.0
    return achieved, limited, len(requests)


def run_until_uploaded(
    base: Path, folder: Path, files: int, drop: Callable[[], None] | None
) -> tuple[dict[str, float], Proc, Usage, list[RequestRecord]]:
    """A running daemon against Sandbox(rate_per_second=R) until every file is uploaded."""
    with Sandbox(api_key=KEY, rate_per_second=BURST_RATE) as sandbox:
        config = write_config(
            base / "config.yaml",
            base_url=sandbox.url,
            folder=folder,
            ledger=base / "ledger.db",
            settle=1.0,
            rate_per_second=BURST_RATE,
        )
        proc = Proc(daemon_argv(config, once=False), env=child_env(), log=True, marks=("scanned",))
        figures: dict[str, float] = {}
        try:
            if not proc.wait_for("scanned", timeout=60):
                raise RuntimeError(f"the burst daemon did not start: {proc.tail()}")
            time.sleep(0.5)
            ledger = Ledger(base / "ledger.db")
            started = time.monotonic()
            if drop is not None:
                drop()
                figures["drop"] = time.monotonic() - started
            recorded_at = None
            deadline = started + max(120.0, files * 0.6)
            state: dict[str, int] = {}
            while time.monotonic() < deadline:
                state = ledger.counts()
                if recorded_at is None and sum(state.values()) >= files:
                    recorded_at = time.monotonic()
                if state["uploaded"] + state["rejected"] + state["failed"] >= files:
                    break
                time.sleep(0.02)
            figures["all_done"] = time.monotonic() - started
            figures["recorded"] = (recorded_at - started) if recorded_at else float("inf")
            figures["uploaded"] = state.get("uploaded", 0)
            ledger.close()
        finally:
            usage = proc.finish(terminate=True, timeout=60)
        requests = sandbox.requests()
    scan_cpu = proc.marks.get("scanned", [Mark(0, 0, None)])[0].cpu or 0.0
    figures["cpu_per_file"] = (usage.cpu - scan_cpu) / files
    return figures, proc, usage, requests


def bench_burst(ctx: Context) -> None:
    report = ctx.report
    files = 100 if ctx.quick else 1000
    prefilled = min(files, 200)
    sample = samples.write_video(ctx.work / "burst-sample.mp4", seconds=1, faststart=True).read_bytes()
    template = ctx.work / "burst-template"
    template.mkdir()
    for index, payload in enumerate(padded_copies(sample, files)):
        (template / f"burst{index:04d}.mp4").write_bytes(payload)
    results, queue_results = [], []
    for number in range(ctx.rounds):
        say(f"burst round {number + 1}/{ctx.rounds}: {files} files, rate {BURST_RATE:g}/s")
        base = ctx.work / f"burst-{number}"
        folder, staging = base / "watched", base / "staging"
        folder.mkdir(parents=True)
        shutil.copytree(template, staging)
        names = sorted(os.listdir(staging))

        def drop(staging: Path = staging, folder: Path = folder, names: list[str] = names) -> None:
            for name in names:
                os.rename(staging / name, folder / name)

        figures, proc, usage, requests = run_until_uploaded(base, folder, files, drop)
        figures["rate"], figures["limited"], figures["requests"] = upload_rate(requests)
        queued = sorted(t for t in (log_time(event) for _, event in proc.named("queued")) if t is not None)
        figures["validation"] = (len(queued) - 1) / (queued[-1] - queued[0]) if len(queued) > 1 else 0.0
        figures["maxrss"] = usage.maxrss
        results.append(figures)
        say(f"  dropped: { {k: round(v, 3) for k, v in figures.items()} }")

        # The same files again, already validated: what the upload pipeline alone does at R.
        requeue(base / "ledger.db", prefilled)
        figures, proc, usage, requests = run_until_uploaded(base, folder, files, None)
        figures["rate"], figures["limited"], figures["requests"] = upload_rate(requests)
        queue_results.append(figures)
        say(f"  queue pre-filled with {prefilled}: { {k: round(v, 3) for k, v in figures.items()} }")
        shutil.rmtree(base)
    shutil.rmtree(template)

    recorded = med(r["recorded"] for r in results)
    achieved = med(r["rate"] for r in results)
    limited = max(r["limited"] for r in results + queue_results)
    uploaded = min(r["uploaded"] for r in results)
    report.add(
        Row(
            f"burst of {files} files: every one recorded in the ledger",
            seconds(recorded),
            f"rename of {files} files {seconds(med(r['drop'] for r in results))}",
            "—",
            "≤ 2 s",
            met(recorded <= 2.0),
            "os.rename into a watched folder; Ledger.counts() polled every 20 ms",
        )
    )
    report.add(
        Row(
            f"burst of {files} files: achieved upload rate, first → last accepted request",
            per_second(achieved),
            f"R = {BURST_RATE:g}/s",
            ratio(achieved, BURST_RATE),
            "within 2 % of R",
            met(abs(achieved - BURST_RATE) <= 0.02 * BURST_RATE),
            f"Sandbox(rate_per_second={BURST_RATE:g}), upload.rate_per_second {BURST_RATE:g}, settle_seconds 1",
        )
    )
    queue_rate = med(r["rate"] for r in queue_results)
    report.add(
        Row(
            f"upload rate with {prefilled} files already validated (queue pre-filled, no probing)",
            per_second(queue_rate),
            f"R = {BURST_RATE:g}/s",
            ratio(queue_rate, BURST_RATE),
            "within 2 % of R",
            met(abs(queue_rate - BURST_RATE) <= 0.02 * BURST_RATE),
            "rows set back to queued in the ledger, daemon restarted",
        )
    )
    report.add(
        Row(
            f"burst of {files} files: 0429 answers (worst round, both variants)",
            str(limited),
            "0",
            "—",
            "0",
            met(limited == 0),
            "sandbox.requests()",
        )
    )
    report.add(
        Row(
            f"burst of {files} files: all uploaded, drop → last upload",
            seconds(med(r["all_done"] for r in results)),
            f"{files} / R = {seconds(files / BURST_RATE)}",
            ratio(med(r["all_done"] for r in results), files / BURST_RATE),
            f"all {files} uploaded",
            met(uploaded >= files),
            "",
        )
    )
    report.detail(
        f"burst: recorded after {listing(r['recorded'] for r in results)}; rates "
        f"{listing((r['rate'] for r in results), per_second)}; validation (settle→probe→queued) throughput "
        f"{listing((r['validation'] for r in results), per_second)}; daemon CPU per file incl. probe children "
        f"{listing(r['cpu_per_file'] for r in results)}; 0429s {[r['limited'] for r in results]}; "
        f"uploaded {[r['uploaded'] for r in results]}; wait4 ru_maxrss {listing((r['maxrss'] for r in results), mib)}"
    )
    report.detail(
        f"pre-filled queue: rates {listing((r['rate'] for r in queue_results), per_second)}; 0429s "
        f"{[r['limited'] for r in queue_results]}; daemon CPU per upload "
        f"{listing(r['cpu_per_file'] * files / prefilled for r in queue_results)}"
    )
