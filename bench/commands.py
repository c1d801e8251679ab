"""How fast the command line answers: `--help` and `status` over 100,000 rows, against a bare `python3 -c pass`.

Each is measured on every core and pinned to one (`taskset -c 0`), the nearest stand-in here for a NAS CPU.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from .measure import med
from .report import Row, listing, met, ratio, say, seconds
from .rig import Context, child_env, counts, daemon_argv, tree_run

# The targets, as multiples of a bare interpreter's start.
HELP_TARGET = 6.0
STATUS_TARGET = 10.0


def wall(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(), check=True)
    return time.perf_counter() - started


def bench_commands(ctx: Context) -> None:
    tree, template = ctx.tree()
    config = tree_run(ctx.work / "commands", tree, template)
    command = daemon_argv(config, once=False)[:-3]
    cases = {
        "python3 -c pass": [sys.executable, "-c", "pass"],
        "--help": [*command, "--help"],
        "status": [*command, "status", "-c", str(config)],
    }
    rounds = max(5, ctx.rounds)
    pinned = ["taskset", "-c", "0"] if shutil.which("taskset") else None
    for cores, prefix in (("all cores", []), ("one core", pinned)):
        if prefix is None:
            say("  taskset is not installed: no one-core figures")
            continue
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, argv in cases.items():
                times[name].append(wall([*prefix, *argv]))
        _report(ctx, cores, times, sum(counts(template).values()))


def _report(ctx: Context, cores: str, times: dict[str, list[float]], rows: int) -> None:
    bare = med(times["python3 -c pass"])
    for name, target, what in (
        ("--help", HELP_TARGET, "memories-ingest --help"),
        ("status", STATUS_TARGET, f"status, a ledger of {rows // 1000}k rows"),
    ):
        took = med(times[name])
        ctx.report.add(
            Row(
                f"{what}, {cores}",
                seconds(took),
                f"python3 -c pass {seconds(bare)}",
                ratio(took, bare),
                f"≤ {target:g}x",
                met(took <= target * bare),
                f"`memories-ingest {name}`" + (" under `taskset -c 0`" if cores == "one core" else ""),
            )
        )
        ctx.report.detail(
            f"{what}, {cores}: {listing(times[name])}; python3 -c pass {listing(times['python3 -c pass'])}"
        )
