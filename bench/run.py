#!/usr/bin/env python3
"""memories-ingest benchmarks: CPU time, memory and delay, side by side with curl, find, sha256sum and the disk.

Run from the repository root with the project's virtual environment:

    .venv/bin/python bench/run.py [--quick] [--only upload,latency,burst,startup,commands,idle,probe] [--rounds N]

Every figure is the median of at least 3 rounds that alternate the daemon and its reference in the same run
(the machine is shared and noisy). The table is printed and written to bench/results.md (see --output).
`--only pacing` runs the proof of bench/pacing.py as a section; the default run leaves it out, for it takes
17 minutes.

Each section is a module of the bench package (bench/upload.py, bench/latency.py, ...); they measure with
bench/measure.py and bench/rig.py, and report with bench/report.py and bench/results.py.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:
    # `python bench/run.py` puts bench/ on sys.path, not the repository root that holds the bench package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    from bench import burst, commands, idle, latency, pacing, probe, startup, upload
    from bench.measure import Proc
    from bench.report import GIB, Report, mib, say, seconds
    from bench.results import revision, write_results
    from bench.rig import BENCH_DIR, PYTHONPATH, Context, child_env
except ImportError as missing:  # pragma: no cover - a setup problem, not a measurement
    sys.exit(f"bench/run.py needs the project installed: .venv/bin/python bench/run.py ({missing})")

SECTIONS: dict[str, Callable[[Context], None]] = {
    "upload": upload.bench_upload,
    "latency": latency.bench_latency,
    "burst": burst.bench_burst,
    "startup": startup.bench_startup,
    "commands": commands.bench_commands,
    "idle": idle.bench_idle,
    "probe": probe.bench_probe,
    "pacing": pacing.bench_pacing,
}
DEFAULT_SECTIONS = ("upload", "latency", "burst", "startup", "commands", "idle", "probe")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller and shorter: a smoke run in < 5 min")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated sections: {', '.join(SECTIONS)} (default: all but pacing)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure (at least 3)")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results.md")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--daemon-path",
        type=Path,
        help="run the daemon from this copy of the package's parent directory (to measure a prototype fix)",
    )
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()] or list(DEFAULT_SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    for tool in ("curl", "find", "sha256sum", "dd"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")

    if args.daemon_path:
        PYTHONPATH.insert(0, str(args.daemon_path.resolve()))
    df = subprocess.run(["df", "-h", str(args.workdir)], capture_output=True, text=True).stdout
    say(f"free space:\n{df.rstrip()}")
    need = (1 + (0 if args.quick else 3)) * GIB + 2 * GIB
    sparse = shutil.disk_usage(args.workdir).free < need and "upload" in sections
    work = Path(tempfile.mkdtemp(prefix="memories-bench-", dir=args.workdir)).resolve()
    ctx = Context(work=work, quick=args.quick, rounds=args.rounds, report=Report(), sparse=sparse)
    if sparse:
        ctx.report.notes.append(
            "disk space was short: the big files are SPARSE, so their padding is not read from disk"
        )
    package = subprocess.run(
        [sys.executable, "-c", "import memories_ingest; print(memories_ingest.__file__)"],
        env=child_env(),
        capture_output=True,
        text=True,
    ).stdout.strip()
    ctx.report.notes.append(f"the daemon ran from {Path(package).parent}, at {revision()}")
    floor = Proc(["true"], env=child_env()).finish()
    ctx.report.notes.append(
        f"ru_maxrss floor of the launcher every measured process starts from: {mib(floor.maxrss)} "
        "(`true` reports this much; references below it read as the floor)"
    )
    started = time.monotonic()
    try:
        for name in sections:
            say(f"== {name}")
            section_start = time.monotonic()
            try:
                SECTIONS[name](ctx)
            except Exception as error:  # one broken section must not lose the others' figures
                ctx.report.notes.append(f"{name}: FAILED: {type(error).__name__}: {error}")
                say(f"  {name} FAILED: {error!r}")
            say(f"  {name} took {seconds(time.monotonic() - section_start)}")
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    body = write_results(args.output, ctx, sections, started, df)
    print(body)
    failed = any(note for note in ctx.report.notes if "FAILED" in note)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
