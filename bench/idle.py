"""Idle cost: the CPU of a daemon watching 100,000 files where nothing happens, with inotify and polling."""

from __future__ import annotations

import shutil
import time

from .measure import Proc, cpu_now, main_thread_cpu, med
from .report import Row, listing, met, mib, percent, ratio, say
from .rig import Context, check_untouched, child_env, counts, daemon_argv, tree_run


def bench_idle(ctx: Context) -> None:
    report = ctx.report
    tree, template = ctx.tree()
    total = sum(counts(template).values())
    window = (20.0 if ctx.quick else 60.0) / ctx.rounds
    results: dict[str, list[dict[str, float]]] = {"inotify": [], "polling": []}
    touched = 0
    for number in range(ctx.rounds):
        for mode in results:
            say(f"idle round {number + 1}/{ctx.rounds}, {mode}: {window:g} s")
            base = ctx.work / f"idle-{mode}-{number}"
            config = tree_run(base, tree, template, polling=mode == "polling")
            ledger = base / "ledger.db"
            proc = Proc(daemon_argv(config, once=False), env=child_env(), log=True)
            try:
                if not proc.wait_for("scanned", timeout=120):
                    raise RuntimeError(f"the daemon did not scan: {proc.tail()}")
                first_scan = time.monotonic() - proc.started
                time.sleep(5.0 if mode == "polling" else 2.0)  # the poller's first passes stay out of the window
                cpu0, main0, t0 = cpu_now(proc.pid), main_thread_cpu(proc.pid), time.monotonic()
                time.sleep(window)
                cpu1, main1, t1 = cpu_now(proc.pid), main_thread_cpu(proc.pid), time.monotonic()
            finally:
                usage = proc.finish(terminate=True, timeout=60)
            assert cpu0 is not None and cpu1 is not None
            main = (main1 - main0) / (t1 - t0) if main0 is not None and main1 is not None else float("nan")
            results[mode].append(
                {"cpu": (cpu1 - cpu0) / (t1 - t0), "main": main, "first_scan": first_scan, "maxrss": usage.maxrss}
            )
            touched += check_untouched(ledger, proc, total, f"idle {mode}")
            shutil.rmtree(base)
    n = f"{total // 1000}k"
    for mode, rows in results.items():
        share = med(r["cpu"] for r in rows)
        inotify = mode == "inotify"
        report.add(
            Row(
                f"idle CPU, {mode}, {n} files watched ({window * ctx.rounds:g} s in {ctx.rounds} windows)",
                f"{share * 100:.2f} % of a core",
                "—",
                "—",
                "≤ 0.5 %" if inotify else "— (report)",
                met(share <= 0.005) if inotify else "—",
                "/proc/PID/task/*/sched over the window",
            )
        )
        report.detail(
            f"idle {mode}: CPU {listing((r['cpu'] for r in rows), percent)}, of which the main thread "
            f"{listing((r['main'] for r in rows), percent)}; start → first scan "
            f"{listing(r['first_scan'] for r in rows)}; wait4 ru_maxrss {listing((r['maxrss'] for r in rows), mib)}"
        )
    polling_rss = max(r["maxrss"] for r in results["polling"])
    report.add(
        Row(
            f"peak RSS, polling mode over {n} files (wait4 ru_maxrss, worst)",
            mib(polling_rss),
            f"inotify {mib(max(r['maxrss'] for r in results['inotify']))}",
            ratio(polling_rss, max(r["maxrss"] for r in results["inotify"])),
            "— (report; 150 MiB is the inotify target)",
            "—",
            "os.wait4",
        )
    )
    if touched:
        report.notes.append(f"idle: {touched} files were touched again while idle")
