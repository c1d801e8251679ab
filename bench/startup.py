"""Start-up and rescan over 100,000 files already uploaded, against find; none of them may be touched again."""

from __future__ import annotations

import shutil
from pathlib import Path

from .measure import Proc, Usage, med
from .report import MIB, Row, listing, met, mib, ratio, say, seconds
from .rig import Context, check_untouched, child_env, counts, daemon_argv, tree_run, write_config


def find_usage(tree: Path) -> Usage:
    return Proc(["find", str(tree), "-type", "f", "-printf", "%s %T@\\n"], env=child_env()).finish()


def bench_startup(ctx: Context) -> None:
    report = ctx.report
    tree, template = ctx.tree()
    total = sum(counts(template).values())
    find_usage(tree)  # warm the dentry and inode caches, for both sides alike
    once, finds, runs = [], [], []
    touched = 0
    for number in range(ctx.rounds):
        say(f"start-up round {number + 1}/{ctx.rounds}")
        base = ctx.work / f"startup-{number}"
        config = tree_run(base, tree, template)
        ledger = base / "ledger.db"
        proc = Proc(daemon_argv(config, once=True), env=child_env(), log=True)
        usage = proc.finish(timeout=300)
        scans = proc.named("scanned")
        once.append((usage, float(scans[0][1].get("seconds", 0)) if scans else float("nan")))
        touched += check_untouched(ledger, proc, total, "run --once")
        finds.append(find_usage(tree))

        config = write_config(
            base / "config.yaml",
            base_url="http://127.0.0.1:9",
            folder=tree,
            ledger=ledger,
            recursive=True,
            rescan=3.0,
        )
        proc = Proc(daemon_argv(config, once=False), env=child_env(), log=True, marks=("scanned",))
        try:
            if not proc.wait_for("scanned", 2, timeout=120):
                raise RuntimeError(f"the daemon did not scan twice: {proc.tail()}")
        finally:
            usage = proc.finish(terminate=True, timeout=60)
        scans = proc.named("scanned")
        marks = proc.marks["scanned"]
        first_cpu, second_cpu = marks[0].cpu, marks[1].cpu
        runs.append(
            {
                "first_scan": scans[0][0] - proc.started,
                "rescan": float(scans[1][1].get("seconds", 0)),
                "rescan_cpu": (second_cpu - first_cpu) if first_cpu is not None and second_cpu is not None else 0.0,
                "maxrss": usage.maxrss,
            }
        )
        touched += check_untouched(ledger, proc, total, "run")
        finds.append(find_usage(tree))
        shutil.rmtree(base)

    fw, fc = med(u.wall for u in finds), med(u.cpu for u in finds)
    ow, oc = med(u.wall for u, _ in once), med(u.cpu for u, _ in once)
    first = med(r["first_scan"] for r in runs)
    rescan, rescan_cpu = med(r["rescan"] for r in runs), med(r["rescan_cpu"] for r in runs)
    rss = max([u.maxrss for u, _ in once] + [r["maxrss"] for r in runs])
    n = f"{total // 1000}k"
    find_cmd = "find TREE -type f -printf '%s %T@\\n' > /dev/null"
    report.add(
        Row(
            f"start-up + first scan, {n} uploaded files (run --once, process start → exit): wall",
            seconds(ow),
            f"find {seconds(fw)}",
            ratio(ow, fw),
            "≤ 10x find",
            met(ow <= 10 * fw),
            find_cmd,
        )
    )
    report.add(
        Row(
            f"start-up + first scan, {n} files (run --once): CPU user+sys",
            seconds(oc),
            f"find {seconds(fc)}",
            ratio(oc, fc),
            "≤ 10x find",
            met(oc <= 10 * fc),
            "os.wait4",
        )
    )
    report.add(
        Row(
            f"run (inotify): process start → first scan done ('scanned'), {n} files",
            seconds(first),
            f"find {seconds(fw)}",
            ratio(first, fw),
            "≤ 10x find",
            met(first <= 10 * fw),
            "time of the 'scanned' log line",
        )
    )
    report.add(
        Row(
            f"full rescan, {n} files (the daemon's own 'scanned' seconds)",
            seconds(rescan),
            f"find {seconds(fw)}",
            ratio(rescan, fw),
            "≤ 10x find",
            met(rescan <= 10 * fw),
            "watch.rescan_seconds 3",
        )
    )
    report.add(
        Row(
            f"full rescan, {n} files: CPU (includes 3 s idle)",
            seconds(rescan_cpu),
            f"find {seconds(fc)}",
            ratio(rescan_cpu, fc),
            "≤ 10x find",
            met(rescan_cpu <= 10 * fc),
            "/proc/PID sched between the two 'scanned' lines",
        )
    )
    report.add(
        Row(
            f"peak RSS, start-up and rescan over {n} files (wait4 ru_maxrss, worst)",
            mib(rss),
            f"find {mib(med(u.maxrss for u in finds))}",
            ratio(rss, med(u.maxrss for u in finds)),
            "≤ 150 MiB",
            met(rss <= 150 * MIB),
            "os.wait4",
        )
    )
    report.add(
        Row(
            f"files probed or hashed again after restart/rescan ({n} uploaded rows)",
            str(touched),
            "0",
            "—",
            "0",
            met(touched == 0),
            "ledger states + 'scanned' new_or_changed + 'queued'/'rejected' lines",
        )
    )
    report.detail(
        f"start-up: run --once wall {listing(u.wall for u, _ in once)}, CPU {listing(u.cpu for u, _ in once)}, "
        f"its scan {listing(s for _, s in once)}; find wall {listing(u.wall for u in finds)}, "
        f"CPU {listing(u.cpu for u in finds)}; run first scan {listing(r['first_scan'] for r in runs)}; "
        f"rescan {listing(r['rescan'] for r in runs)}, rescan CPU {listing(r['rescan_cpu'] for r in runs)}; "
        f"ru_maxrss {listing((u.maxrss for u, _ in once), mib)} (--once), "
        f"{listing((r['maxrss'] for r in runs), mib)} (run)"
    )
