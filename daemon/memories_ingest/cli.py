"""The `memories-ingest` command: run the daemon, look into the ledger, and try things out safely."""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import MutableMapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import structlog

from . import __version__, probe, prober, view
from .api import DEFAULT_SCOPE, DIALECTS
from .config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    Folder,
    MissingApiKey,
    ledger_path,
    load,
    parse,
    read_api_key,
    redact,
)
from .indexer import ListenFailed
from .ledger import Ledger, LedgerError, LedgerHeld, LedgerLocationError, LedgerLock, Row, location_problem
from .monitor import Metrics
from .pacing import Access, Gate, Pacer
from .recovery import rebuild
from .service import Daemon, Exit, Signals, pause_for_another_ledger, stop_on_signals
from .states import DELIVERED, FAILED, GONE, PENDING, REJECTED, RETRYABLE, RETRYING, STATES, UPLOADED
from .uploader import Client, ListFailed
from .view import printable
from .watcher import Recorder
from .worker import Settler, UploadWorker


def configure_logging(stream: TextIO = sys.stderr, level: int = logging.INFO) -> None:
    """JSON lines for journald and pipes, readable coloured lines on a terminal; never the API key."""
    rendering: Any = (
        structlog.dev.ConsoleRenderer(colors=True, exception_formatter=structlog.dev.plain_traceback)
        if stream.isatty()
        else structlog.processors.JSONRenderer(sort_keys=False)
    )

    def scrub(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        # Before rendering too: JSON escapes a key holding " or \, and the escaped form would slip past.
        return {name: _scrubbed(value) for name, value in event.items()}

    def renderer(logger: Any, method: str, event: Any) -> str:
        bar = _ProgressBar.active
        if bar is not None:
            bar.end()
        # The last line of defence: whatever put a key into an event, the line written has none.
        return redact(str(rendering(logger, method, event)))

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamp,
            scrub,
            # Tracebacks without local variables: a frame's locals could hold the API key.
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
            if not stream.isatty()
            else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return [_scrubbed(item) for item in value]
    if isinstance(value, dict):
        return {name: _scrubbed(item) for name, item in value.items()}
    return value


def _timestamp(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Local time with its UTC offset, so that a line means one moment wherever it is read."""
    event["timestamp"] = datetime.now().astimezone().isoformat(timespec="milliseconds")
    return event


def _report(problems: Sequence[str]) -> None:
    print(f"the config has {len(problems)} problem(s):", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def _load_config(path: str) -> Config:
    try:
        return load(path)
    except ConfigError as error:
        _report(error.problems)
        raise SystemExit(Exit.CONFIG) from None


def _preflight(config: Config) -> str:
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
        _report(problems)
        raise SystemExit(Exit.CONFIG)
    return key


def _ledger_path(config_path: str) -> Path:
    try:
        return ledger_path(config_path)
    except ConfigError as error:
        _report(error.problems)
        raise SystemExit(Exit.CONFIG) from None


def _open_ledger(path: Path, *, create: bool = False) -> Ledger:
    try:
        return Ledger(path, create=create)
    except LedgerLocationError as error:
        print(f"memories-ingest: {error}", file=sys.stderr)
        raise SystemExit(Exit.CONFIG) from None
    except LedgerError as error:
        print(f"memories-ingest: {error}", file=sys.stderr)
        raise SystemExit(Exit.UNAVAILABLE) from None


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"


def cmd_check(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    key = _preflight(config)
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
    client = _client(config, key)
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


def _client(config: Config, key: str) -> Client:
    return Client(
        config.api.base_url,
        key,
        connect_timeout=config.api.connect_timeout_seconds,
        read_timeout=config.api.read_timeout_seconds,
        min_bytes_per_second=config.upload.min_bytes_per_second,
    )


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
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
            key = _preflight(config)
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
    ledger = _open_ledger(config.ledger, create=True)
    client = _client(config, key)
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


def cmd_status(args: argparse.Namespace) -> int:
    ledger = _open_ledger(_ledger_path(args.config))
    try:
        if args.json:
            print(json.dumps(view.status(ledger), indent=2))
        elif args.watch:
            stop = _stop_on_signals()
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


def _stop_on_signals() -> threading.Event:
    # SIGHUP too: a dropped SSH session must stop an `upload` cleanly, not kill it mid-row.
    return stop_on_signals(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _row_json(row: Row) -> dict[str, Any]:
    return row.to_json()


def cmd_list(args: argparse.Namespace) -> int:
    ledger = _open_ledger(_ledger_path(args.config))
    rows = ledger.rows(args.state)
    ledger.close()
    if args.json:
        print(json.dumps([_row_json(row) for row in rows], indent=2))
        return 0
    for row in rows:
        detail = row.video_no or row.error or ""
        print(f"{row.state:<12} {row.attempts:>2}  {printable(row.path)}  {printable(detail)}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    state = FAILED if args.all_failed else args.state
    if not state and not args.paths:
        print("memories-ingest retry: name files, or use --state STATE (or --all-failed)", file=sys.stderr)
        return Exit.USAGE
    ledger = _open_ledger(_ledger_path(args.config))
    try:
        if state:
            print(f"{ledger.retry_state(state)} {state} file(s) back in the queue")
        for path, done in ledger.retry([Path(p).absolute() for p in args.paths]):
            print(f"{printable(path)}: {done}")
    finally:
        ledger.close()
    return Exit.OK


def cmd_resume(args: argparse.Namespace) -> int:
    ledger = _open_ledger(_ledger_path(args.config))
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


def cmd_rebuild(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    key = _preflight(config)
    lock = LedgerLock(config.ledger)
    try:
        config.ledger.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock.acquire()
    except LedgerHeld as error:
        print(f"memories-ingest: {error}", file=sys.stderr)
        return Exit.LEDGER_HELD
    ledger = _open_ledger(config.ledger, create=True)
    client = _client(config, key)
    try:
        found = rebuild(
            config, ledger, client, dry_run=args.dry_run, stop=_stop_on_signals(), report=lambda line: print(line)
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


class _ProgressBar:
    """One line on a terminal, redrawn in place: the file, its bar, the bytes sent of the total, the speed, the ETA.

    A log line ends the bar first (see configure_logging), so the two never share a line.
    """

    active: _ProgressBar | None = None

    def __init__(self, name: str, size: int, stream: TextIO = sys.stderr) -> None:
        self.name = printable(name)
        self.size = size
        self.stream = stream
        self.started = time.monotonic()

    def __call__(self, sent: int) -> None:
        if not self.stream.isatty():
            return
        percent = 100 * sent / self.size if self.size else 100.0
        elapsed = max(time.monotonic() - self.started, 1e-6)
        speed = sent / elapsed
        eta = f"ETA {(self.size - sent) / speed:.0f} s" if speed > 0 and sent < self.size else "ETA -"
        # \x1b[K clears what a longer line drawn before left at its end.
        self.stream.write(
            f"\r{self.name} {view.bar(percent)} {percent:5.1f}%  {view.size(sent)} of {view.size(self.size)}"
            f"  {view.size(speed)}/s  {eta}\x1b[K"
        )
        self.stream.flush()
        _ProgressBar.active = self

    def end(self) -> None:
        """Leave the bar's line, so that what is written next starts on a line of its own."""
        if _ProgressBar.active is self:
            self.stream.write("\n")
            self.stream.flush()
            _ProgressBar.active = None


def cmd_upload(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    if args.unique_id == "":
        print("memories-ingest upload: --unique-id must not be empty", file=sys.stderr)
        return Exit.USAGE
    key = _preflight(config)
    paths = [Path(p).absolute() for p in args.files]
    folders = {path.parent: _upload_folder(config, path, args.unique_id, args.tag) for path in paths}
    config = dataclasses.replace(config, folders=(*folders.values(), *config.folders))
    ledger = _open_ledger(config.ledger, create=True)
    earlier = ledger.earlier_ledger()
    if earlier is not None and ledger.pause() is None:
        print(f"memories-ingest: {pause_for_another_ledger(ledger, earlier)}", file=sys.stderr)
    client = _client(config, key)
    stop = _stop_on_signals()
    gate = Gate(ledger, account_check_seconds=config.upload.account_check_seconds, key_id=client.key_id)
    settler = Settler(stop, config, ledger, threading.Event(), threading.Event())
    uploader = UploadWorker(
        stop=stop,
        number=1,
        config=config,
        ledger=ledger,
        client=client,
        pacer=Pacer(ledger, config.upload.rate_per_second),
        gate=gate,
        uploads_ready=threading.Event(),
        actions_ready=threading.Event(),
        abandon=stop,
        metrics=Metrics(),
    )
    recorder = Recorder(config, ledger, threading.Event())
    problems = 0
    try:
        for path in paths:
            outcome = _upload_one(path, folders[path.parent], ledger, recorder, settler, uploader, gate, stop)
            print(printable(outcome))
            problems += not outcome.startswith(("uploaded", "already uploaded"))
            if stop.is_set():
                break
        pause = gate.pause
    finally:
        client.close()
        ledger.close()
    if pause is not None and pause.kind in ("account", "ledger"):
        return Exit.PAUSED
    return 1 if problems else 0


def _upload_one(
    path: Path,
    folder: Folder,
    ledger: Ledger,
    recorder: Recorder,
    settler: Settler,
    uploader: UploadWorker,
    gate: Gate,
    stop: threading.Event,
) -> str:
    """Validate and upload one file in the foreground, through the ledger and the daemon's retry rules."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError as error:
        return f"rejected {path}: {error.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return f"rejected {path}: not a regular file"
    recorder.record(path, info, folder)
    row = ledger.get(path)
    if row is None:
        return f"rejected {path}: an ignored name (hidden or temporary)"
    if row.state in DELIVERED:
        return f"already uploaded {path}: {row.video_no}"
    if row.state in (FAILED, REJECTED, GONE):
        ledger.retry([path])
    # An `upload` that died mid-row (killed, its terminal gone) left it `uploading`: this one takes it over.
    ledger.requeue_orphans()
    progress = _ProgressBar(path.name, info.st_size)
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
            settler.validate(row, folder)
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


def cmd_probe(args: argparse.Namespace) -> int:
    path = Path(args.file)
    reason = probe.check_name(path)
    if reason is None:
        try:
            media = probe.probe_path(path, require_audio=args.require_audio)
        except probe.Rejection as rejection:
            reason = str(rejection)
        else:
            print(json.dumps({"path": str(path.absolute()), "accepted": True, **media.to_json()}, indent=2))
            return 0
    print(json.dumps({"path": str(path.absolute()), "accepted": False, "reason": reason}, indent=2))
    return 1


def cmd_sandbox(args: argparse.Namespace) -> int:
    from .sandbox import serve

    serve(args.host, args.port, args.api_key, dialect=args.dialect, rate_per_second=args.upload_rate)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .samples import write_video
    from .sandbox import Sandbox

    demo_key = "demo-key"
    with (
        tempfile.TemporaryDirectory(prefix="memories-ingest-demo-") as tmp,
        Sandbox(api_key=demo_key) as sandbox,
    ):
        watch = Path(tmp) / "camera"
        watch.mkdir()
        config = parse(
            {
                "api": {"base_url": sandbox.url},
                "ledger": str(Path(tmp) / "ledger.db"),
                "watch": {"settle_seconds": 1},
                "defaults": {"tags": ["demo"]},
                "folders": [
                    {
                        "path": str(watch),
                        "unique_id": "demo-garden",
                        "tags": ["garden"],
                        "camera_model": "Demo Cam",
                        "latitude": 51.5007,
                        "longitude": -0.1246,
                    }
                ],
            },
            Path(tmp) / "config.yaml",
        )
        print(f"sandbox API at {sandbox.url}, watching {watch}", file=sys.stderr)
        ledger = Ledger(config.ledger)
        client = Client(config.api.base_url, demo_key)
        daemon = Daemon(config, ledger, client)
        runner = threading.Thread(target=daemon.run, name="daemon")
        runner.start()
        target = watch / "garden.mp4"
        recorded = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000000Z")
        partial = write_video(watch / "garden.mp4.part", seconds=2, audio=True, metadata={"creation_time": recorded})
        partial.rename(target)
        deadline = time.monotonic() + 60
        row = ledger.get(target)
        while (row is None or row.state != UPLOADED) and time.monotonic() < deadline:
            daemon.stop.wait(0.2)
            row = ledger.get(target)
        daemon.request_stop()
        runner.join()
        client.close()
        ledger.close()
        if row is None or row.state != UPLOADED:
            print(f"demo failed: the video did not reach the sandbox (row: {row})", file=sys.stderr)
            return 1
        print("ledger row:")
        print(json.dumps(_row_json(row), indent=2))
        print("the sandbox received:")
        for video in sandbox.received():
            print(json.dumps({**video.__dict__}, indent=2, default=str))
    return 0


def _rate(text: str) -> float:
    from .sandbox import parse_rate

    try:
        return parse_rate(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memories-ingest", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", default=DEFAULT_CONFIG_PATH, help=f"the YAML config (default {DEFAULT_CONFIG_PATH})"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help="watch and upload until SIGTERM or SIGINT")
    run.add_argument("--once", action="store_true", help="process what is there now, then exit")
    run.set_defaults(handler=cmd_run)

    status = commands.add_parser("status", parents=[common], help="counts per state, uploads, pause, next retry")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true", help="redraw the view live until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    status.set_defaults(handler=cmd_status)

    listing = commands.add_parser("list", parents=[common], help="the ledger's rows")
    listing.add_argument("--state", choices=STATES)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list)

    retry = commands.add_parser(
        "retry", parents=[common], help="put files back in the queue; each is validated again, then uploaded"
    )
    retry.add_argument("--state", choices=RETRYABLE, help="every file in this state")
    retry.add_argument("--all-failed", action="store_true", help="every failed file (the same as --state failed)")
    retry.add_argument("paths", nargs="*", metavar="PATH", help="these files; each is told what was done, and why")
    retry.set_defaults(handler=cmd_retry)

    upload = commands.add_parser(
        "upload", parents=[common], help="upload files once, outside the daemon, with the same checks and ledger"
    )
    upload.add_argument("files", nargs="+", metavar="FILE")
    upload.add_argument("--unique-id", help="the memories.ai folder scope (default: the file's watched folder's)")
    upload.add_argument("--tag", action="append", default=[], help="a tag to add; repeat for more")
    upload.set_defaults(handler=cmd_upload)

    resume = commands.add_parser(
        "resume", parents=[common], help="lift a pause of every upload now; after an account refusal, try one upload"
    )
    resume.set_defaults(handler=cmd_resume)

    rebuilding = commands.add_parser(
        "rebuild",
        parents=[common],
        help="record as uploaded every file in the folders that list_videos shows memories.ai already holds",
    )
    rebuilding.add_argument("--dry-run", action="store_true", help="say what would be recorded, and record nothing")
    rebuilding.set_defaults(handler=cmd_rebuild)

    check = commands.add_parser(
        "check", parents=[common], help="validate the config, the ledger's place and the key, then exit"
    )
    check.add_argument(
        "--online",
        action="store_true",
        help="also ask the API, read-only, whether the key works (one list_videos call; never an upload)",
    )
    check.set_defaults(handler=cmd_check)

    probing = commands.add_parser("probe", parents=[common], help="what validation says about one file")
    probing.add_argument("file")
    probing.add_argument("--require-audio", action="store_true")
    probing.set_defaults(handler=cmd_probe)

    sandbox = commands.add_parser("sandbox", parents=[common], help="run the local emulator of the API")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8765)
    sandbox.add_argument("--api-key", default=None, help="the key it accepts (default: any non-empty key)")
    sandbox.add_argument(
        "--dialect",
        choices=DIALECTS,
        default=DIALECTS[0],
        help="v1.2: string codes on HTTP 200 (the default); v2: the newer API's integer codes equal to the HTTP status",
    )
    sandbox.add_argument(
        "--upload-rate",
        type=_rate,
        default=1.0,
        metavar="RATE",
        help="the account's upload limit, e.g. 1/s (the default), 1/60s or 2/min",
    )
    sandbox.set_defaults(handler=cmd_sandbox)

    demo = commands.add_parser("demo", parents=[common], help="upload a sample video to a local sandbox")
    demo.set_defaults(handler=cmd_demo)
    return parser


PR_SET_DUMPABLE = 4
# Commands that only print: when what reads them goes away (`status | head`), they end quietly, as `cat` does.
PRINTING_COMMANDS = frozenset({"status", "list", "check", "probe", "retry", "resume"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in PRINTING_COMMANDS:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    configure_logging()
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
