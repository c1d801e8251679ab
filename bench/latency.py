"""Latency: from a file closed in a watched folder to its upload request at the sink, with inotify and polling."""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

from memories_ingest import samples

from .measure import Proc, log_time, med
from .report import Row, listing, met, ratio, seconds
from .rig import Context, Sink, child_env, daemon_argv, padded_copies, write_config


def bench_latency(ctx: Context) -> None:
    report = ctx.report
    rounds = max(ctx.rounds, 3 if ctx.quick else 5)
    settle = 1.0
    sample = samples.write_video(ctx.work / "latency-sample.mp4", seconds=1, faststart=True).read_bytes()
    payloads = iter(padded_copies(sample, 2 * rounds))
    modes = {"inotify": False, "polling": True}
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with Sink() as sink, contextlib.ExitStack() as stack:
        daemons: dict[str, tuple[Proc, Path]] = {}
        for mode, polling in modes.items():
            base = ctx.work / f"latency-{mode}"
            folder = base / "watched"
            folder.mkdir(parents=True)
            config = write_config(
                base / "config.yaml",
                base_url=sink.url,
                folder=folder,
                ledger=base / "ledger.db",
                settle=settle,
                polling=polling,
            )
            proc = Proc(daemon_argv(config, once=False), env=child_env(), log=True)
            stack.callback(proc.finish, terminate=True, timeout=30)
            if not proc.wait_for("scanned", timeout=30):
                raise RuntimeError(f"the {mode} daemon did not start: {proc.tail()}")
            daemons[mode] = (proc, folder)
        time.sleep(2.5)  # the poller's first passes
        sink.stats()
        for number in range(rounds):
            for mode, (proc, folder) in daemons.items():
                # A random phase, so drops do not lock onto the poller's period.
                time.sleep(random.uniform(0.0, 3.0))
                before = proc.count("uploaded")
                path = folder / f"clip{number}.mp4"
                with open(path, "wb") as file:
                    file.write(next(payloads))
                closed, closed_epoch = time.monotonic(), time.time()
                if not proc.wait_for("uploaded", before + 1, timeout=30):
                    raise RuntimeError(f"{mode}: {path.name} was not uploaded: {proc.tail()}")
                records = sink.stats()
                if len(records) != 1:
                    raise RuntimeError(f"{mode}: expected one request at the sink, got {records}")
                stamps = {
                    name: log_time(proc.named(name)[-1][1]) or 0.0 for name in ("queued", "uploading", "uploaded")
                }
                results[mode].append(
                    {
                        "latency": records[0]["arrived"] - closed,
                        "queued": stamps["queued"] - closed_epoch,
                        "uploading": stamps["uploading"] - closed_epoch,
                    }
                )
    for mode, rows in results.items():
        latency = med(r["latency"] for r in rows)
        inotify = mode == "inotify"
        report.add(
            Row(
                f"latency, file closed → upload request at the sink, {mode}, settle_seconds {settle:g}",
                seconds(latency),
                f"settle_seconds {seconds(settle)}",
                ratio(latency, settle),
                f"≤ settle + 0.25 s = {seconds(settle + 0.25)}" if inotify else "— (report)",
                met(latency <= settle + 0.25) if inotify else "—",
                "write+close a new file in a watched folder of a running daemon",
            )
        )
        report.detail(
            f"latency {mode}: close→request {listing(r['latency'] for r in rows)}; "
            f"close→'queued' (settled, probed, fingerprinted) median {seconds(med(r['queued'] for r in rows))}; "
            f"close→'uploading' median {seconds(med(r['uploading'] for r in rows))}"
        )
