"""bench/results.md: the table, the details and the set-up of one run, with the machine and the revision measured."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from datetime import datetime
from pathlib import Path

from .burst import BURST_RATE
from .report import seconds, table
from .rig import BENCH_DIR, Context


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return (
        f"{os.cpu_count()} x {cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"{' '.join(curl.split()[:2])}"
    )


def revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=BENCH_DIR.parent, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "daemon")
    return f"commit {commit}" + (" with uncommitted daemon changes" if dirty else "")


def write_results(path: Path, ctx: Context, sections: list[str], started: float, df: str) -> str:
    report = ctx.report
    mode = "quick" if ctx.quick else "full"
    misses = [row for row in report.rows if row.met.startswith("**no")]
    text = [
        "# memories-ingest benchmark results",
        "",
        f"`python bench/run.py{' --quick' if ctx.quick else ''}` ({mode}; sections: {', '.join(sections)}; "
        f"{ctx.rounds} alternating rounds, medians) on {datetime.now():%Y-%m-%d %H:%M}, "
        f"in {seconds(time.monotonic() - started)}.",
        "",
        f"Machine: {machine()}.",
        "",
        table(report.rows),
        "",
        f"Targets not met: {len(misses)}."
        + "".join(f"\n- {row.figure}: {row.daemon} ({row.target})" for row in misses),
        "",
        "## Details",
        "",
        *[f"- {line}" for line in report.details + report.notes],
        "",
        "## Set-up",
        "",
        "- Large files: `samples.write_video(..., faststart=True)` + `samples.faststart_padding(path, size, "
        f"sparse={ctx.sparse})`, fsynced; cold-cache rounds drop the file's pages first with "
        "`posix_fadvise(POSIX_FADV_DONTNEED)`.",
        "- Upload sink: `bench/sink.py` in its own process (stdlib, 4 MiB `recv_into`, boundary scan with "
        "`bytearray.find`), answering `code 0000`.",
        f"- Burst: `Sandbox(rate_per_second={BURST_RATE:g})` in the bench process, daemon `upload.rate_per_second: "
        f"{BURST_RATE:g}`, `settle_seconds: 1`.",
        "",
        "```",
        df.rstrip(),
        "```",
        "",
    ]
    body = "\n".join(text)
    path.write_text(body)
    return body
