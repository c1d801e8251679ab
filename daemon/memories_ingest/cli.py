"""The `memories-ingest` command: run the daemon, look into the ledger, and try things out safely."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import structlog

from . import __version__, probe
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, MissingApiKey, load, parse, read_api_key
from .ledger import STATES, UPLOADED, UPLOADING, Ledger, LedgerError, Row
from .service import Daemon
from .uploader import Client

EXIT_CONFIG = 78
EXIT_UNAVAILABLE = 69


def configure_logging(stream: TextIO = sys.stderr, level: int = logging.INFO) -> None:
    """JSON lines for journald and pipes, readable coloured lines on a terminal."""
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True, exception_formatter=structlog.dev.plain_traceback)
        if stream.isatty()
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
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


def _load_config(path: str) -> Config:
    try:
        return load(path)
    except ConfigError as error:
        print(f"the config has {len(error.problems)} problem(s):", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _open_ledger(config: Config) -> Ledger:
    try:
        return Ledger(config.ledger)
    except LedgerError as error:
        print(f"memories-ingest: {error}", file=sys.stderr)
        raise SystemExit(EXIT_UNAVAILABLE) from None


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"


def cmd_check(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    print(f"{config.source}: OK, {len(config.folders)} folder(s)")
    for folder in config.folders:
        missing = "" if folder.path.is_dir() else "  (does not exist yet: it is watched once it appears)"
        print(f"  {folder.path} -> unique_id={folder.unique_id or '-'} tags={list(folder.tags)}{missing}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    try:
        key = read_api_key(config.api)
    except MissingApiKey as error:
        print(f"memories-ingest: {error}", file=sys.stderr)
        return EXIT_CONFIG
    ledger = _open_ledger(config)
    client = Client(
        config.api.base_url,
        key,
        connect_timeout=config.api.connect_timeout_seconds,
        read_timeout=config.api.read_timeout_seconds,
        min_bytes_per_second=config.upload.min_bytes_per_second,
    )
    daemon = Daemon(config, ledger, client, once=args.once)

    def on_signal(signum: int, frame: object) -> None:
        daemon.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return daemon.run()
    except LedgerError as error:
        structlog.get_logger().error("stopping: the ledger cannot be written", error=str(error))
        return EXIT_UNAVAILABLE
    finally:
        client.close()
        ledger.close()


def status_document(ledger: Ledger) -> dict[str, Any]:
    pause = ledger.pause()
    next_retry = ledger.next_retry()
    return {
        "counts": ledger.counts(),
        "uploading": [{"path": str(r.path), "attempts": r.attempts, "size": r.size} for r in ledger.rows(UPLOADING)],
        "paused": None
        if pause is None
        else {"reason": pause.reason, "kind": pause.kind, "since": pause.since, "until": pause.until},
        "next_retry": None
        if next_retry is None
        else {"path": str(next_retry.path), "at": next_retry.next_attempt_at, "error": next_retry.error},
    }


def cmd_status(args: argparse.Namespace) -> int:
    ledger = _open_ledger(_load_config(args.config))
    document = status_document(ledger)
    ledger.close()
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print("  ".join(f"{state}: {count}" for state, count in document["counts"].items() if count) or "ledger is empty")
    for upload in document["uploading"]:
        print(f"uploading: {upload['path']} ({upload['size']} bytes, attempt {upload['attempts']})")
    if document["paused"]:
        paused = document["paused"]
        print(f"paused: {paused['reason']} since {_when(paused['since'])}, next check {_when(paused['until'])}")
    if document["next_retry"]:
        retry = document["next_retry"]
        print(f"next retry: {retry['path']} at {_when(retry['at'])} ({retry['error']})")
    return 0


def _row_json(row: Row) -> dict[str, Any]:
    return row.to_json()


def cmd_list(args: argparse.Namespace) -> int:
    ledger = _open_ledger(_load_config(args.config))
    rows = ledger.rows(args.state)
    ledger.close()
    if args.json:
        print(json.dumps([_row_json(row) for row in rows], indent=2))
        return 0
    for row in rows:
        detail = row.video_no or row.error or ""
        print(f"{row.state:<12} {row.attempts:>2}  {row.path}  {detail}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    if not args.all_failed and not args.paths:
        print("memories-ingest retry: name files, or use --all-failed", file=sys.stderr)
        return 2
    ledger = _open_ledger(_load_config(args.config))
    paths = None if args.all_failed else [Path(p).absolute() for p in args.paths]
    changed = ledger.retry(paths)
    ledger.close()
    print(f"{changed} file(s) back in the queue")
    return 0


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

    serve(args.host, args.port, args.api_key)
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
    status.set_defaults(handler=cmd_status)

    listing = commands.add_parser("list", parents=[common], help="the ledger's rows")
    listing.add_argument("--state", choices=STATES)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list)

    retry = commands.add_parser("retry", parents=[common], help="put failed files back in the queue")
    retry.add_argument("--all-failed", action="store_true")
    retry.add_argument("paths", nargs="*", metavar="PATH")
    retry.set_defaults(handler=cmd_retry)

    check = commands.add_parser("check", parents=[common], help="validate the config and exit")
    check.set_defaults(handler=cmd_check)

    probing = commands.add_parser("probe", parents=[common], help="what validation says about one file")
    probing.add_argument("file")
    probing.add_argument("--require-audio", action="store_true")
    probing.set_defaults(handler=cmd_probe)

    sandbox = commands.add_parser("sandbox", parents=[common], help="run the local emulator of the API")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8765)
    sandbox.add_argument("--api-key", default=None, help="the key it accepts (default: any non-empty key)")
    sandbox.set_defaults(handler=cmd_sandbox)

    demo = commands.add_parser("demo", parents=[common], help="upload a sample video to a local sandbox")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
