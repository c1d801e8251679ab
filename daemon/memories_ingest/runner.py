"""The commands that use the account: run the daemon, check the config and the key, rebuild, upload."""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from . import prober, view
from .api import DEFAULT_SCOPE
from .commands import open_ledger, report_problems, stop_on_interrupt
from .config import Config, Folder, load
from .configfile import ConfigError
from .exits import Exit
from .indexer import ListenFailed
from .keys import MissingApiKey, read_api_key
from .ledger import Ledger, LedgerError, LedgerHeld, LedgerLock, location_problem
from .pacing import Access
from .pipeline import Pipeline, build
from .recovery import rebuild
from .service import Daemon, pause_for_another_ledger
from .signals import Signals
from .states import DELIVERED, FAILED, GONE, PENDING, REJECTED, RETRYING
from .uploader import Client, ListFailed
from .view import printable
from .worker import FILE_RETRY_POLICY, Events

PR_SET_DUMPABLE = 4


def load_config(path: str) -> Config:
    try:
        return load(path)
    except ConfigError as error:
        report_problems(error.problems)
        raise SystemExit(Exit.CONFIG) from None


def preflight(config: Config) -> str:
    """What `run` needs beyond a valid config: a place for the ledger and a usable key. Returns the key.

    Every problem is reported together, as `check` reports them, and the process exits 78.
    """
    problems = []
    location = location_problem(config.ledger)
    if location is not None:
        problems.append(f"{config.source}: ledger: {location}")
    key = ""
    try:
        key = read_api_key(config.api)
    except MissingApiKey as error:
        problems.append(f"{config.source}: api: {error}")
    if problems:
        report_problems(problems)
        raise SystemExit(Exit.CONFIG)
    return key


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    key = preflight(config)
    print(f"{config.source}: OK, {len(config.folders)} folder(s)")
    for folder in config.folders:
        missing = "" if folder.path.is_dir() else "  (does not exist yet: it is watched once it appears)"
        print(f"  {folder.path} -> unique_id={folder.unique_id or '-'} tags={list(folder.tags)}{missing}")
    if not args.online:
        return Exit.OK
    return _check_online(config, key)


def _check_online(config: Config, key: str) -> int:
    """One read-only call with the key (list_videos, one video of the first folder's scope); never an upload."""
    scope = config.folders[0].unique_id
    client = client_for(config, key)
    try:
        client.list_videos(unique_id=scope, size=1)
    except ListFailed as error:
        refused = error.outcome is not None and error.outcome.kind == "account"
        print(f"{config.api.base_url}: {error}", file=sys.stderr)
        return Exit.KEY_REFUSED if refused else Exit.UNAVAILABLE
    finally:
        client.close()
    print(f"{config.api.base_url}: the key works (list_videos answered for scope {scope or DEFAULT_SCOPE})")
    return Exit.OK


def client_for(config: Config, key: str) -> Client:
    return Client(
        config.api.base_url,
        key,
        connect_timeout=config.api.connect_timeout_seconds,
        read_timeout=config.api.read_timeout_seconds,
        min_bytes_per_second=config.upload.min_bytes_per_second,
    )


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    prober.start()
    _not_dumpable()
    log = structlog.get_logger()
    signals = Signals()

    def on_stop(signum: int, frame: object) -> None:
        signals.stops += 1

    def on_reload(signum: int, frame: object) -> None:
        signals.reloads += 1

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)
    held: LedgerLock | None = None
    try:
        while True:
            key = preflight(config)
            if held is None or held.path != LedgerLock(config.ledger).path:
                try:
                    held = _hold(config, held)
                except LedgerHeld as error:
                    print(f"memories-ingest: {error}", file=sys.stderr)
                    return Exit.LEDGER_HELD
            code, reloaded = _run_daemon(config, key, args, signals, log)
            if reloaded is None:
                return code
            config = reloaded
    finally:
        if held is not None:
            held.release()


def _not_dumpable() -> None:
    """Keep other processes of this user (a subverted probe child among them) out of /proc/PID/environ and mem.

    The key is in this process's memory, and may be in its environment; without PR_SET_DUMPABLE, any process
    of the same uid could read both.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        structlog.get_logger().warning("cannot make the daemon undumpable", error=os.strerror(ctypes.get_errno()))


def _hold(config: Config, held: LedgerLock | None) -> LedgerLock:
    """Hold the config's ledger (and let go of the one held before, after a reload moved it)."""
    config.ledger.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = LedgerLock(config.ledger)
    lock.acquire()
    if held is not None:
        held.release()
    return lock


def _run_daemon(
    config: Config, key: str, args: argparse.Namespace, signals: Signals, log: Any
) -> tuple[int, Config | None]:
    """One daemon's life: its exit code, and the config to start the next with after a reload."""
    ledger = open_ledger(config.ledger, create=True)
    client = client_for(config, key)
    try:
        daemon = Daemon(
            config,
            ledger,
            client,
            once=args.once,
            grace_seconds=config.upload.shutdown_grace_seconds,
            loader=lambda: load(args.config),
            signals=signals,
        )
        code = daemon.run()
        if args.once:
            print(daemon.summary())
    except ListenFailed as error:
        log.error("cannot listen for indexing callbacks", error=str(error))
        return Exit.CONFIG, None
    except LedgerError as error:
        log.error("stopping: the ledger cannot be written", error=str(error))
        return Exit.UNAVAILABLE, None
    finally:
        client.close()
        ledger.close()
    return code, daemon.reloaded


def cmd_rebuild(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    key = preflight(config)
    lock = LedgerLock(config.ledger)
    try:
        config.ledger.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock.acquire()
    except LedgerHeld as error:
        print(f"memories-ingest: {error}", file=sys.stderr)
        return Exit.LEDGER_HELD
    ledger = open_ledger(config.ledger, create=True)
    client = client_for(config, key)
    try:
        found = rebuild(
            config, ledger, client, dry_run=args.dry_run, stop=stop_on_interrupt(), report=lambda line: print(line)
        )
        would = "would be " if args.dry_run else ""
        print(
            f"{found.matched + found.by_name} file(s) {would}recorded as already on memories.ai "
            f"({found.matched} by their identity tag, {found.by_name} by name and size), {found.known} already in "
            f"the ledger, {found.not_found} not found there (the daemon uploads them)"
        )
        for problem in found.unreadable:
            print(f"  cannot be read: {printable(problem)}")
        if not args.dry_run:
            pause = ledger.pause()
            if pause is not None and pause.kind == "ledger":
                ledger.clear_pause()
                print("the pause for a new ledger is lifted")
            ledger.remember()
    except ListFailed as error:
        print(f"memories-ingest: {error}", file=sys.stderr)
        return Exit.UNAVAILABLE
    finally:
        client.close()
        ledger.close()
        lock.release()
    return Exit.OK


def _upload_folder(config: Config, path: Path, unique_id: str | None, tags: Sequence[str]) -> Folder:
    """The settings for a file given on the command line: its watched folder's, else the defaults'."""
    base = config.folder_for(path) or config.defaults
    return dataclasses.replace(
        base,
        path=path.parent,
        recursive=False,
        unique_id=unique_id or base.unique_id,
        tags=tuple(dict.fromkeys([*base.tags, *tags])),
    )


def cmd_upload(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.unique_id == "":
        print("memories-ingest upload: --unique-id must not be empty", file=sys.stderr)
        return Exit.USAGE
    key = preflight(config)
    paths = [Path(p).absolute() for p in args.files]
    folders = {path.parent: _upload_folder(config, path, args.unique_id, args.tag) for path in paths}
    config = dataclasses.replace(config, folders=(*folders.values(), *config.folders))
    ledger = open_ledger(config.ledger, create=True)
    earlier = ledger.earlier_ledger()
    if earlier is not None and ledger.pause() is None:
        print(f"memories-ingest: {pause_for_another_ledger(ledger, earlier)}", file=sys.stderr)
    client = client_for(config, key)
    stop = stop_on_interrupt()
    # The person at the terminal who asks to stop means now: the upload in flight is abandoned at once.
    events = Events.create(stop=stop, abandon=stop)
    parts = build(
        config, ledger, client, events=events, policy=FILE_RETRY_POLICY, clock=time.time, watch=False, index=False
    )
    problems = 0
    try:
        for path in paths:
            outcome = _upload_one(path, folders[path.parent], ledger, parts)
            print(printable(outcome))
            problems += not outcome.startswith(("uploaded", "already uploaded"))
            if stop.is_set():
                break
        pause = parts.gate.pause
    finally:
        client.close()
        ledger.close()
    if pause is not None and pause.kind in ("account", "ledger"):
        return Exit.PAUSED
    return Exit.NOT_UPLOADED if problems else Exit.OK


def _admit(path: Path, folder: Folder, ledger: Ledger, parts: Pipeline) -> str | os.stat_result:
    """Record a file given on the command line: the outcome when that already decides it, else the file's stat."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError as error:
        return f"rejected {path}: {error.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return f"rejected {path}: not a regular file"
    parts.recorder.record(path, info, folder)
    row = ledger.get(path)
    if row is None:
        return f"rejected {path}: an ignored name (hidden or temporary)"
    if row.state in DELIVERED:
        return f"already uploaded {path}: {row.video_no}"
    if row.state in (FAILED, REJECTED, GONE):
        ledger.retry([path])
    # An `upload` that died mid-row (killed, its terminal gone) left it `uploading`: this one takes it over.
    ledger.requeue_orphans()
    return info


def _upload_one(path: Path, folder: Folder, ledger: Ledger, parts: Pipeline) -> str:
    """Validate and upload one file in the foreground, through the ledger and the daemon's retry rules."""
    admitted = _admit(path, folder, ledger, parts)
    if isinstance(admitted, str):
        return admitted
    stop, gate, uploader = parts.events.stop, parts.gate, parts.uploaders[0]
    progress = view.ProgressBar(path.name, admitted.st_size)
    uploader.on_progress = progress
    while not stop.is_set():
        row = ledger.get(path)
        assert row is not None
        if row.state in DELIVERED:
            note = f" ({row.error})" if row.error else ""
            return f"uploaded {path}: {row.video_no}{note}"
        if row.state in (REJECTED, FAILED, GONE):
            return f"{row.state} {path}: {row.error}"
        if row.state == PENDING:
            parts.settler.validate(row, folder)
            continue
        pause = gate.pause
        if pause is not None and pause.kind in ("account", "ledger"):
            return f"paused {path}: {pause.reason}"
        wait = (row.next_attempt_at or 0) - time.time()
        if row.state == RETRYING and wait > 0:
            print(f"retrying {path} in {wait:.0f} s: {row.error}", file=sys.stderr)
        if wait > 0 and stop.wait(min(wait, 5.0)):
            break
        access = gate.wait_open(stop)
        if access is Access.STOPPED:
            break
        claimed = ledger.claim_row(row.id)
        outcome = None if claimed is None else uploader.attempt(claimed)
        uploader.settle_gate(outcome, trial=access is Access.TRIAL)
        progress.end()
        if claimed is None:
            stop.wait(0.5)
            continue
        if sys.stderr.isatty():
            sys.stderr.write("\n")
    return f"interrupted {path}: it stays in the ledger, and the daemon or a new `upload` finishes it"
