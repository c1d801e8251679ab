"""Probe and fingerprint: what validating a file costs, against PyAV in-process and sha256sum."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from memories_ingest import files, probe, samples

from .measure import Proc, children_cpu, med, self_cpu
from .report import GIB, Row, listing, ratio, say, seconds
from .rig import Context, child_env, evict


def reference_probe(path: Path) -> None:
    """What the probe's FFmpeg work costs without the isolated child: open and decode the first frame."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for packet in container.demux(stream):
            if packet.decode():
                return


def bench_probe(ctx: Context) -> None:
    report = ctx.report
    small = samples.write_video(ctx.work / "probe-sample.mp4", seconds=2, faststart=True)
    big = ctx.video(GIB)
    size = big.stat().st_size
    calls = 20
    reference_probe(small)  # import av once, outside the timings
    fd = os.open(big, os.O_RDONLY)
    results: dict[str, list[tuple[float, float]]] = {}

    def timed(name: str, action: Callable[[], object], repeat: int = 1) -> None:
        c0, s0, t0 = children_cpu(), self_cpu(), time.monotonic()
        for _ in range(repeat):
            action()
        wall = (time.monotonic() - t0) / repeat
        cpu = (children_cpu() - c0 + self_cpu() - s0) / repeat
        results.setdefault(name, []).append((wall, cpu))

    def sha256sum(cold: bool) -> None:
        if cold:
            evict(big)
        usage = Proc(["sha256sum", str(big)], env=child_env()).finish()
        results.setdefault("sha256sum cold" if cold else "sha256sum", []).append((usage.wall, usage.cpu))

    def fingerprint_cold() -> None:
        evict(big)
        timed("fingerprint cold", lambda: files.fingerprint(fd, size))

    try:
        for number in range(ctx.rounds):
            say(f"probe round {number + 1}/{ctx.rounds}")
            timed("probe", lambda: probe.probe_path(small), calls)
            timed("probe in-process", lambda: reference_probe(small), calls)
            timed("probe 1 GiB", lambda: probe.probe_path(big), calls)
            timed("fingerprint", lambda: files.fingerprint(fd, size), 50)
            sha256sum(cold=False)
            fingerprint_cold()
            sha256sum(cold=True)
    finally:
        os.close(fd)

    def wall(name: str) -> float:
        return med(w for w, _ in results[name])

    def cpu(name: str) -> float:
        return med(c for _, c in results[name])

    report.add(
        Row(
            "probe_path per file (isolated), wall",
            seconds(wall("probe")),
            f"in-process PyAV {seconds(wall('probe in-process'))}",
            ratio(wall("probe"), wall("probe in-process")),
            "— (report)",
            "—",
            "memories_ingest.probe.probe_path vs av.open + first frame",
        )
    )
    report.add(
        Row(
            "probe_path per file (isolated), CPU incl. every helper process",
            seconds(cpu("probe")),
            f"in-process PyAV {seconds(cpu('probe in-process'))}",
            ratio(cpu("probe"), cpu("probe in-process")),
            "— (report)",
            "—",
            "RUSAGE_SELF + reaped children + living descendants' /proc stat deltas",
        )
    )
    gib = size / GIB
    for suffix, label in (("", "warm cache"), (" cold", "cold cache")):
        fw, fc = wall("fingerprint" + suffix), cpu("fingerprint" + suffix)
        sw, sc = wall("sha256sum" + suffix), cpu("sha256sum" + suffix)
        report.add(
            Row(
                f"fingerprint of a 1 GiB file, {label}: wall per file",
                seconds(fw),
                f"sha256sum {seconds(sw)}",
                ratio(fw, sw),
                "— (report)",
                "—",
                "files.fingerprint (first + last MiB) vs sha256sum F",
            )
        )
        report.add(
            Row(
                f"fingerprint, {label}: CPU per GiB of video",
                seconds(fc / gib),
                f"sha256sum {seconds(sc / gib)}/GiB",
                ratio(fc / gib, sc / gib),
                "— (report)",
                "—",
                "",
            )
        )
    report.detail(
        f"probe: small sample wall {listing(w for w, _ in results['probe'])}, 1 GiB file wall "
        f"{listing(w for w, _ in results['probe 1 GiB'])}, "
        f"in-process {listing(w for w, _ in results['probe in-process'])}; "
        f"fingerprint warm {listing(w for w, _ in results['fingerprint'])}, cold "
        f"{listing(w for w, _ in results['fingerprint cold'])}; sha256sum warm "
        f"{listing(w for w, _ in results['sha256sum'])}, cold {listing(w for w, _ in results['sha256sum cold'])}"
    )
