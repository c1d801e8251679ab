"""The ledger's commands: status, list, retry, resume. They load no more than the ledger needs, to answer at once."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import view
from .configfile import ConfigError, ledger_path
from .exits import Exit
from .ledger import Ledger, LedgerError, LedgerLocationError, Row
from .signals import stop_on_signals
from .states import FAILED
from .view import printable


def report_problems(problems: Sequence[str]) -> None:
    print(f"the config has {len(problems)} problem(s):", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def find_ledger(config_path: str) -> Path:
    try:
        return ledger_path(config_path)
    except ConfigError as error:
        report_problems(error.problems)
        raise SystemExit(Exit.CONFIG) from None


def open_ledger(path: Path, *, create: bool = False) -> Ledger:
    try:
        return Ledger(path, create=create)
    except LedgerLocationError as error:
        print(f"memories-ingest: {error}", file=sys.stderr)
        raise SystemExit(Exit.CONFIG) from None
    except LedgerError as error:
        print(f"memories-ingest: {error}", file=sys.stderr)
        raise SystemExit(Exit.UNAVAILABLE) from None


def cmd_status(args: argparse.Namespace) -> int:
    ledger = open_ledger(find_ledger(args.config))
    try:
        if args.json:
            print(json.dumps(view.status(ledger), indent=2))
        elif args.watch:
            stop = stop_on_interrupt()
            while True:
                sys.stdout.write("\x1b[H\x1b[2J" + view.render(view.status(ledger)) + "\n")
                sys.stdout.flush()
                if stop.wait(args.interval):
                    break
        else:
            print(view.render(view.status(ledger)))
    finally:
        ledger.close()
    return Exit.OK


def stop_on_interrupt() -> threading.Event:
    # SIGHUP too: a dropped SSH session must stop an `upload` cleanly, not kill it mid-row.
    return stop_on_signals(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def row_json(row: Row) -> dict[str, Any]:
    return row.to_json()


def cmd_list(args: argparse.Namespace) -> int:
    ledger = open_ledger(find_ledger(args.config))
    rows = ledger.rows(args.state)
    ledger.close()
    if args.json:
        print(json.dumps([row_json(row) for row in rows], indent=2))
        return Exit.OK
    for row in rows:
        detail = row.video_no or row.error or ""
        print(f"{row.state:<12} {row.attempts:>2}  {printable(row.path)}  {printable(detail)}")
    return Exit.OK


def cmd_retry(args: argparse.Namespace) -> int:
    state = FAILED if args.all_failed else args.state
    if not state and not args.paths:
        print("memories-ingest retry: name files, or use --state STATE (or --all-failed)", file=sys.stderr)
        return Exit.USAGE
    ledger = open_ledger(find_ledger(args.config))
    try:
        if state:
            print(f"{ledger.retry_state(state)} {state} file(s) back in the queue")
        for path, done in ledger.retry([Path(p).absolute() for p in args.paths]):
            print(f"{printable(path)}: {done}")
    finally:
        ledger.close()
    return Exit.OK


def cmd_resume(args: argparse.Namespace) -> int:
    ledger = open_ledger(find_ledger(args.config))
    try:
        lifted = ledger.resume(time.time())
        if lifted is None:
            print("uploads are not paused")
        elif lifted.kind == "account":
            print(f"lifted: {lifted.reason}\nthe next upload goes out now, as the trial")
        else:
            print(f"lifted: {lifted.reason}")
            if lifted.kind == "ledger":
                ledger.remember()
    finally:
        ledger.close()
    return Exit.OK
