#!/usr/bin/env python3
"""How far apart the daemon's uploads reach the server: the proof that no two come closer than 1/rate.

Run from the repository root with the project's virtual environment:

    .venv/bin/python bench/pacing.py [--requests 1000] [--rate 1]

A real daemon (`memories-ingest run`) uploads that many real, distinct sample videos, all dropped into its folder
at once, so that the settler probes the burst while the uploads go out. The sandbox runs as a process of its own
at the same rate and logs the moment each request arrives (after its headers are read, as a server counts it).
The result: the closest pair of arrivals, the number of pairs closer than 1/rate, and the number of 0429s.
`bench/run.py --only pacing` runs the same measurement as a section of the results table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if not __package__:
    # `python bench/pacing.py` puts bench/ on sys.path, not the repository root that holds the bench package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import Row, met, ratio, say, seconds
from bench.rig import KEY, Context
from memories_ingest.samples import write_video

# The rate of the README's proof: 1,000 uploads at 1/s take 17 minutes, so run.py runs this section only by name.
PACING_RATE = 1.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "memories_ingest.cli", *args]


def measure(requests: int, rate: float, workdir: Path) -> dict[str, float | int]:
    folder = workdir / "watched"
    folder.mkdir()
    staging = workdir / "staging"
    staging.mkdir()
    for number in range(requests):
        # Distinct content, so that no file is a copy of another: a frame count and a size of its own.
        write_video(
            staging / f"clip{number:05}.mp4", seconds=1 + (number % 50) / 10, size=(64 + 2 * (number // 50), 64)
        )
    port = free_port()
    sandbox = subprocess.Popen(
        command("sandbox", "--port", str(port), "--upload-rate", f"{rate}/s"), stderr=subprocess.PIPE, text=True
    )
    arrivals: list[tuple[float, str | None]] = []

    def read_sandbox_log() -> None:
        assert sandbox.stderr is not None
        for line in sandbox.stderr:
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "sandbox_request" and event.get("path", "").endswith("/upload"):
                    arrivals.append((float(event["arrived_at"]), event.get("code")))

    threading.Thread(target=read_sandbox_log, daemon=True).start()
    config = workdir / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "api": {"base_url": f"http://127.0.0.1:{port}"},
                "ledger": str(workdir / "ledger.db"),
                "watch": {"settle_seconds": 1},
                "upload": {"rate_per_second": rate},
                "folders": [{"path": str(folder), "unique_id": "pacing"}],
            }
        )
    )
    time.sleep(1.0)
    daemon = subprocess.Popen(
        command("run", "-c", str(config)),
        env={**os.environ, "MEMORIES_API_KEY": KEY},
        stderr=subprocess.DEVNULL,
    )
    started = time.monotonic()
    for path in staging.iterdir():
        path.rename(folder / path.name)
    try:
        while sum(code == "0000" for _, code in arrivals) < requests:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon ended early with {daemon.returncode}")
            time.sleep(1.0)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        sandbox.send_signal(signal.SIGTERM)
        sandbox.wait(60)
    times = sorted(moment for moment, _ in arrivals)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    return {
        "requests": len(times),
        "accepted": sum(code == "0000" for _, code in arrivals),
        "rate_limited": sum(code == "0429" for _, code in arrivals),
        "closest_pair_seconds": round(min(gaps), 4),
        "pairs_closer_than_1_over_rate": sum(gap < 1 / rate for gap in gaps),
        "seconds": round(time.monotonic() - started, 1),
    }


def bench_pacing(ctx: Context) -> None:
    report = ctx.report
    requests = 100 if ctx.quick else 1000
    say(f"pacing: {requests} uploads at {PACING_RATE:g}/s")
    workdir = ctx.work / "pacing"
    workdir.mkdir()
    result = measure(requests, PACING_RATE, workdir)
    closest, interval = float(result["closest_pair_seconds"]), 1 / PACING_RATE
    report.add(
        Row(
            f"closest pair of uploads as the server counts them, {requests} files at {PACING_RATE:g}/s",
            seconds(closest),
            f"1/rate = {seconds(interval)}",
            ratio(closest, interval),
            "never under 1x",
            met(result["pairs_closer_than_1_over_rate"] == 0),
            f"bench/pacing.py --requests {requests} --rate {PACING_RATE:g}",
        )
    )
    report.add(
        Row(
            f"pacing, {requests} files at {PACING_RATE:g}/s: 0429 answers",
            str(result["rate_limited"]),
            "0",
            "—",
            "0",
            met(result["rate_limited"] == 0),
            "the sandbox's request log",
        )
    )
    report.detail(f"pacing: {json.dumps(result)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1.0)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memories-ingest-pacing-") as workdir:
        result = measure(arguments.requests, arguments.rate, Path(workdir))
    print(json.dumps({"rate_per_second": arguments.rate, **result}))
    return 0 if result["pairs_closer_than_1_over_rate"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
