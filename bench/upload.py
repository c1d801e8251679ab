"""Upload cost: the daemon against curl for one file, cold and warm; the disk and the sink as references."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .measure import Proc, Usage, log_time, med
from .report import GIB, MIB, Row, listing, met, mib, rate, ratio, say, seconds
from .rig import KEY, UPLOAD_PATH, Context, Sink, child_env, counts, daemon_argv, evict, write_config


def sendfile_upload(url: str, path: Path) -> tuple[float, float]:
    """The cheapest possible client: one multipart request whose file part goes out with sendfile(2)."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "bench" + os.urandom(8).hex()
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + path.stat().st_size + len(tail)
    request = (
        f"POST {UPLOAD_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    started, cpu = time.monotonic(), time.thread_time()
    with socket.create_connection((host, int(port))) as sock, open(path, "rb") as file:
        sock.sendall(request + head)
        sock.sendfile(file)
        sock.sendall(tail)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    wall, cpu = time.monotonic() - started, time.thread_time() - cpu
    if b'"0000"' not in answer:
        raise RuntimeError(f"the sink refused the sendfile upload: {answer[:200]!r}")
    return wall, cpu


@dataclass
class UploadRun:
    usage: Usage
    sink_wall: float
    sink_cpu: float
    hwm: int = 0
    upload_wall: float | None = None  # the daemon's log: "uploading" -> "uploaded"
    upload_cpu: float | None = None  # the daemon's CPU between those two lines


def one_upload(ctx: Context, sink: Sink, client: str, path: Path, *, cold: bool) -> UploadRun:
    size = path.stat().st_size
    if cold:
        evict(path)
    sink.stats()
    if client == "curl":
        argv = ["curl", "-s", "-F", f"file=@{path};type=video/mp4", "-H", f"Authorization: {KEY}"]
        proc = Proc([*argv, sink.url + UPLOAD_PATH], env=child_env(), stdout=subprocess.PIPE)
        usage = proc.finish(timeout=60 + size / (20 * MIB))
        assert proc.popen.stdout is not None
        answer = proc.popen.stdout.read()
        proc.popen.stdout.close()
        if b'"0000"' not in answer:
            raise RuntimeError(f"curl's upload failed: {answer[:200]!r}")
    else:
        folder = ctx.work / f"upload-{client}-{time.monotonic_ns()}"
        folder.mkdir()
        config = write_config(
            folder / "config.yaml", base_url=sink.url, folder=path.parent, ledger=folder / "ledger.db"
        )
        proc = Proc(
            daemon_argv(config, once=True),
            env=child_env(),
            log=True,
            marks=("uploading", "uploaded"),
            sample_hwm=True,
        )
        usage = proc.finish(timeout=60 + size / (20 * MIB))
        state = counts(folder / "ledger.db")
        if usage.code != 0 or state.get("uploaded") != 1:
            raise RuntimeError(f"the daemon did not upload {path}: exit {usage.code}, ledger {state}: {proc.tail()}")
        shutil.rmtree(folder)
    records = sink.stats()
    if len(records) != 1 or records[0]["file_bytes"] != size:
        raise RuntimeError(f"the sink did not get exactly one whole file from {client}: {records}")
    record = records[0]
    run = UploadRun(usage, record["done"] - record["arrived"], record["cpu"])
    if client == "daemon":
        run.hwm = proc.hwm
        start, end = proc.named("uploading"), proc.named("uploaded")
        if start and end:
            t0, t1 = log_time(start[0][1]), log_time(end[0][1])
            if t0 is not None and t1 is not None:
                run.upload_wall = t1 - t0
        m0, m1 = proc.marks.get("uploading"), proc.marks.get("uploaded")
        if m0 and m1 and m0[0].cpu is not None and m1[0].cpu is not None:
            run.upload_cpu = m1[0].cpu - m0[0].cpu
    return run


def bench_upload(ctx: Context) -> None:
    report = ctx.report
    sizes = [10 * MIB, GIB] + ([] if ctx.quick else [3 * GIB])
    videos = {size: ctx.video(size) for size in sizes}
    cases = [(size, True) for size in sizes] + [(size, False) for size in sizes if size >= GIB]  # cold, then warm
    runs: dict[tuple[int, bool, str], list[UploadRun]] = {}
    raw_disk: list[float] = []
    sendfile: list[tuple[float, float, float]] = []
    with Sink() as sink:
        for number in range(ctx.rounds):
            say(f"upload round {number + 1}/{ctx.rounds}")
            for size, cold in cases:
                for client in ("daemon", "curl"):
                    run = one_upload(ctx, sink, client, videos[size], cold=cold)
                    runs.setdefault((size, cold, client), []).append(run)
            evict(videos[GIB])
            dd = Proc(["dd", f"if={videos[GIB]}", "of=/dev/null", "bs=1M"], env=child_env())
            raw_disk.append(dd.finish().wall)
            sink.stats()
            wall, client_cpu = sendfile_upload(sink.url, videos[GIB])
            records = sink.stats()
            sendfile.append((wall, records[0]["cpu"], client_cpu))

    for size, cold in cases:
        d, c = runs[(size, cold, "daemon")], runs[(size, cold, "curl")]
        cache = "cold cache" if cold else "warm cache"
        what = f"upload {mib(size) if size < GIB else f'{size // GIB} GiB'}, {cache}"
        big = size >= GIB
        dw, cw = med(r.usage.wall for r in d), med(r.usage.wall for r in c)
        dc, cc = med(r.usage.cpu for r in d), med(r.usage.cpu for r in c)
        report.add(
            Row(
                f"{what}: wall, whole run",
                seconds(dw),
                f"curl {seconds(cw)}",
                ratio(dw, cw),
                "≤ 1.1x curl" if big else "— (start-up + probe dominate)",
                met(dw <= 1.1 * cw) if big else "—",
                "memories-ingest run --once / curl -s -F file=@F",
            )
        )
        report.add(
            Row(
                f"{what}: CPU user+sys, whole run",
                seconds(dc),
                f"curl {seconds(cc)}",
                ratio(dc, cc),
                "≤ 1.25x curl" if big else "—",
                met(dc <= 1.25 * cc) if big else "—",
                "os.wait4 rusage (daemon includes its probe child)",
            )
        )
        dsw, csw = med(r.sink_wall for r in d), med(r.sink_wall for r in c)
        report.add(
            Row(
                f"{what}: the upload itself, wall (request's first byte → body end at the sink)",
                f"{seconds(dsw)} ({rate(size, dsw)})",
                f"curl {seconds(csw)} ({rate(size, csw)})",
                ratio(dsw, csw),
                "≤ 1.1x curl" if big else "—",
                met(dsw <= 1.1 * csw) if big else "—",
                "sink's own clock",
            )
        )
        upload_cpu = [r.upload_cpu for r in d if r.upload_cpu is not None]
        if upload_cpu:
            duc = med(upload_cpu)
            report.add(
                Row(
                    f"{what}: CPU of the upload itself",
                    seconds(duc),
                    f"curl {seconds(cc)} (whole run)",
                    ratio(duc, cc),
                    "≤ 1.25x curl" if big else "—",
                    met(duc <= 1.25 * cc) if big else "—",
                    "/proc/PID sched between the 'uploading' and 'uploaded' log lines",
                )
            )
        report.detail(
            f"{what}: daemon wall {listing(r.usage.wall for r in d)}; curl wall {listing(r.usage.wall for r in c)}; "
            f"daemon CPU {listing(r.usage.cpu for r in d)}; curl CPU {listing(r.usage.cpu for r in c)}; "
            f"daemon log uploading→uploaded {listing(r.upload_wall or 0 for r in d)}; "
            f"sink CPU per request: daemon {listing(r.sink_cpu for r in d)}, curl {listing(r.sink_cpu for r in c)}"
        )

    # Memory: the daemon's own peak (VmHWM) and wait4's ru_maxrss, which folds in the probe child.
    for size in sizes:
        d, c = runs[(size, True, "daemon")], runs[(size, True, "curl")]
        label = mib(size) if size < GIB else f"{size // GIB} GiB"
        hwm, ru = med(r.hwm for r in d), med(r.usage.maxrss for r in d)
        report.add(
            Row(
                f"peak RSS uploading {label}: daemon process (VmHWM)",
                mib(hwm),
                f"curl {mib(med(r.usage.maxrss for r in c))}",
                ratio(hwm, med(r.usage.maxrss for r in c)),
                "≤ 64 MiB",
                met(hwm <= 64 * MIB),
                "/proc/PID/status VmHWM, sampled every 20 ms",
            )
        )
        report.add(
            Row(
                f"peak RSS uploading {label}: wait4 ru_maxrss (daemon or its probe child)",
                mib(ru),
                f"curl {mib(med(r.usage.maxrss for r in c))}",
                ratio(ru, med(r.usage.maxrss for r in c)),
                "≤ 64 MiB",
                met(ru <= 64 * MIB),
                "os.wait4",
            )
        )
    small, large = min(sizes), max(sizes)
    peaks: tuple[tuple[str, Callable[[UploadRun], float]], ...] = (
        ("VmHWM", lambda r: r.hwm),
        ("wait4 ru_maxrss", lambda r: r.usage.maxrss),
    )
    for label, value in peaks:
        a = med(value(r) for r in runs[(small, True, "daemon")])
        b = med(value(r) for r in runs[(large, True, "daemon")])
        growth = b / a - 1
        report.add(
            Row(
                f"peak RSS growth, {mib(small)} → {mib(large)} file ({label})",
                f"{growth * 100:+.1f} % ({mib(a)} → {mib(b)})",
                "—",
                "—",
                "within 10 %",
                met(abs(growth) <= 0.10),
                "",
            )
        )

    # The references: the disk, and how fast the sink itself takes a body.
    disk = med(raw_disk)
    dcold = med(r.sink_wall for r in runs[(GIB, True, "daemon")])
    report.add(
        Row(
            "raw disk: cold sequential read of 1 GiB vs the daemon's cold upload",
            rate(GIB, dcold),
            f"dd bs=1M {rate(GIB, disk)}",
            ratio(disk, dcold),
            "— (the floor for cold uploads)",
            "—",
            "dd if=F of=/dev/null bs=1M after posix_fadvise(DONTNEED)",
        )
    )
    sf_wall, sf_cpu = med(w for w, _, _ in sendfile), med(c for _, c, _ in sendfile)
    sf_client = med(c for _, _, c in sendfile)
    dwarm = med(r.sink_wall for r in runs[(GIB, False, "daemon")])
    cwarm = med(r.sink_wall for r in runs[(GIB, False, "curl")])
    sink_cpu = med(r.sink_cpu for r in runs[(GIB, False, "daemon")] + runs[(GIB, False, "curl")])
    report.add(
        Row(
            "sink capacity: 1 GiB from a sendfile(2) client (warm) vs the daemon's warm upload",
            rate(GIB, dwarm),
            f"sendfile {rate(GIB, sf_wall)}",
            ratio(sf_wall, dwarm),
            "sink faster than both clients",
            met(sf_wall < dwarm and sf_wall < cwarm),
            "python socket.sendfile → bench/sink.py",
        )
    )
    report.detail(
        f"sink CPU per GiB: {seconds(sf_cpu)} with the sendfile client, {seconds(sink_cpu)} with the daemon and curl "
        f"(warm); curl warm {rate(GIB, cwarm)}, daemon warm {rate(GIB, dwarm)}, sendfile {rate(GIB, sf_wall)} "
        f"with {seconds(sf_client)} of client CPU per GiB; "
        f"raw disk cold reads {listing(raw_disk)}"
    )
