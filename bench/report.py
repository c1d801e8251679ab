"""What a benchmark section reports: rows of the results table, detail lines, and the units they are written in."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

MIB, GIB = 1 << 20, 1 << 30


@dataclass
class Row:
    figure: str
    daemon: str
    reference: str
    ratio: str
    target: str
    met: str
    command: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        say(f"  {row.figure}: {row.daemon} vs {row.reference} ({row.ratio}) target {row.target}: {row.met}")

    def detail(self, text: str) -> None:
        self.details.append(text)
        say(f"  {text}")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def seconds(value: float) -> str:
    if value < 0.001:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def mib(value: float) -> str:
    return f"{value / MIB:.1f} MiB"


def rate(bytes_count: float, wall: float) -> str:
    return f"{bytes_count / GIB / wall:.2f} GiB/s"


def per_second(value: float) -> str:
    return f"{value:.2f}/s"


def percent(share: float) -> str:
    return f"{share * 100:.2f} %"


def ratio(value: float, reference: float) -> str:
    if not reference:
        return "—"
    share = value / reference
    return f"{share:.2f}x" if share >= 0.1 else f"{share:.2g}x"


def met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def listing(values: Iterable[float], unit: Callable[[float], str] = seconds) -> str:
    return ", ".join(unit(v) for v in values)


def table(rows: list[Row], with_command: bool = False) -> str:
    head = ["figure", "daemon", "reference", "ratio", "target", "met?"]
    if with_command:
        head = ["figure", "daemon", "reference", "ratio", "command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.figure, row.daemon, row.reference, row.ratio, row.target, row.met]
        if with_command:
            cells = [row.figure, row.daemon, row.reference, row.ratio, row.command]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)
