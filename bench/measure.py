"""Measuring processes: the CPU time, peak memory and log events of the children a benchmark starts, and medians.

Child processes are measured with os.wait4 (CPU user+sys, ru_maxrss); a running daemon's CPU over a window is
read from /proc/PID/task/*/sched (ns resolution), falling back to /proc/PID/stat ticks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .report import say

KIB = 1 << 10
CLK_TCK = os.sysconf("SC_CLK_TCK")
HAVE_SCHED = Path("/proc/self/sched").exists()


def med(values: Iterable[float]) -> float:
    return statistics.median(list(values))


@dataclass(frozen=True)
class Usage:
    wall: float
    user: float
    sys: float
    maxrss: int  # bytes: the process or any descendant it waited for (Linux folds children into wait4's answer)
    code: int

    @property
    def cpu(self) -> float:
        return self.user + self.sys


@dataclass(frozen=True)
class Mark:
    at: float
    cpu: float | None
    hwm: int | None


def stat_cpu(pid: int) -> float | None:
    """User+sys of every thread, living or dead, in clock ticks turned into seconds."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def sched_cpu(pid: int) -> float | None:
    """Sum of se.sum_exec_runtime over the living threads: nanosecond resolution, for windows."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0.0
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/sched").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("se.sum_exec_runtime"):
                total += float(line.split(":", 1)[1]) / 1000
                break
    return total


def main_thread_cpu(pid: int) -> float | None:
    """The main thread alone (the daemon's supervision loop), from its sched file."""
    if not HAVE_SCHED:
        return None
    try:
        text = Path(f"/proc/{pid}/task/{pid}/sched").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("se.sum_exec_runtime"):
            return float(line.split(":", 1)[1]) / 1000
    return None


def cpu_now(pid: int) -> float | None:
    return sched_cpu(pid) if HAVE_SCHED else stat_cpu(pid)


def vm_hwm(pid: int) -> int | None:
    """The process's own peak RSS so far (VmHWM), without its children."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KIB
    return None


def log_time(event: dict[str, Any]) -> float | None:
    """A structlog ISO timestamp (local time, or UTC with Z) as epoch seconds."""
    stamp = event.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# A small launcher between the bench and every measured process. Linux folds the RSS of the memory image a
# process had before exec into its ru_maxrss, and a child forked (or vforked) from this bench inherits the
# bench's image: spawned directly, even curl would report the bench's 75 MiB. The launcher is a bare
# `python -S -I` (about 5 MiB), which forks, execs, wait4s and reports the rusage; measured figures have its
# floor, which the bench reports next to them.
LAUNCHER = """
import json, os, sys, time
report = int(sys.argv[1])
started = time.monotonic()
pid = os.fork()
if pid == 0:
    os.close(report)
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
os.write(report, b"%d %r\\n" % (pid, started))
_, status, usage = os.wait4(pid, 0)
ended = time.monotonic()
answer = {"wall": ended - started, "user": usage.ru_utime, "sys": usage.ru_stime, "maxrss": usage.ru_maxrss,
          "code": os.waitstatus_to_exitcode(status)}
os.write(report, json.dumps(answer).encode() + b"\\n")
"""


class Proc:
    """A measured child process (os.wait4 through the launcher); optionally its JSON log, with marks at events."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        log: bool = False,
        marks: Iterable[str] = (),
        sample_hwm: bool = False,
        stdout: int | None = subprocess.DEVNULL,
    ) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.marks: dict[str, list[Mark]] = {}
        self.hwm = 0
        self._mark_names = set(marks)
        self._cond = threading.Condition()
        self._eof = not log
        self._finished = threading.Event()
        self._threads: list[threading.Thread] = []
        read_end, write_end = os.pipe()
        self.popen = subprocess.Popen(
            [sys.executable, "-S", "-I", "-c", LAUNCHER, str(write_end), *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE if log else subprocess.DEVNULL,
            pass_fds=(write_end,),
        )
        os.close(write_end)
        self._report = os.fdopen(read_end, "rb")
        first = self._report.readline().split()
        if len(first) != 2:
            self.popen.wait()
            raise RuntimeError(f"could not start {argv}")
        self.pid, self.started = int(first[0]), float(first[1])
        if log:
            self._spawn(self._read_log)
        if sample_hwm:
            self._spawn(self._sample_hwm)

    def _spawn(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _read_log(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            now = time.monotonic()
            try:
                event = json.loads(raw)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                event = {"event": "(text)", "text": raw.decode(errors="replace").rstrip()}
            mark = None
            if event.get("event") in self._mark_names:
                hwm = vm_hwm(self.pid)
                mark = Mark(now, cpu_now(self.pid), hwm)
                if hwm:
                    self.hwm = max(self.hwm, hwm)
            with self._cond:
                self.events.append((now, event))
                if mark is not None:
                    self.marks.setdefault(event["event"], []).append(mark)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _sample_hwm(self) -> None:
        while not self._finished.wait(0.02):
            hwm = vm_hwm(self.pid)
            if hwm:
                self.hwm = max(self.hwm, hwm)

    def count(self, name: str) -> int:
        with self._cond:
            return sum(1 for _, event in self.events if event.get("event") == name)

    def named(self, name: str) -> list[tuple[float, dict[str, Any]]]:
        with self._cond:
            return [(at, event) for at, event in self.events if event.get("event") == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = sum(1 for _, event in self.events if event.get("event") == name)
                if found >= count:
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return False
                self._cond.wait(min(left, 0.5))

    def finish(self, *, terminate: bool = False, timeout: float = 600.0) -> Usage:
        if terminate:
            hwm = vm_hwm(self.pid)
            if hwm:
                self.hwm = max(self.hwm, hwm)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        killer = threading.Timer(timeout, self._kill)
        killer.daemon = True
        killer.start()
        line = self._report.readline()
        killer.cancel()
        self._finished.set()
        self.popen.wait()
        self._report.close()
        for thread in self._threads:
            thread.join(timeout=5)
        if self.popen.stderr is not None:
            self.popen.stderr.close()
        if not line:
            raise RuntimeError(f"the launcher of pid {self.pid} died (exit {self.popen.returncode})")
        answer = json.loads(line)
        return Usage(answer["wall"], answer["user"], answer["sys"], answer["maxrss"] * KIB, answer["code"])

    def _kill(self) -> None:
        say(f"  pid {self.pid} ran past its timeout: killing it; its last log lines: {self.tail()}")
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)

    def tail(self, lines: int = 6) -> list[dict[str, Any]]:
        """The last log lines, and every error or warning, for failure messages."""
        with self._cond:
            events = [event for _, event in self.events]
        loud = [e for e in events if e.get("level") in ("error", "critical", "exception")][:3]
        return loud + events[-lines:]


def children_cpu() -> float:
    """Reaped children (os.times), plus every living descendant with what it reaped itself (/proc).

    A probe may run in a long-lived helper (a fork server) that this process never reaps: its CPU and its
    own children's only show in /proc/PID/stat (utime, stime, cutime, cstime).
    """
    usage = os.times()
    total = usage.children_user + usage.children_system
    pending, seen = [os.getpid()], set()
    while pending:
        pid = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                    if int(child) not in seen:
                        seen.add(int(child))
                        pending.append(int(child))
    for pid in seen:
        with contextlib.suppress(OSError, ValueError, IndexError):
            data = Path(f"/proc/{pid}/stat").read_bytes()
            rest = data[data.rindex(b")") + 2 :].split()
            total += sum(int(field) for field in rest[11:15]) / CLK_TCK
    return total


def self_cpu() -> float:
    return time.process_time()
