"""The `memories-ingest` command: run the daemon, look into the ledger, and try things out safely."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import MutableMapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from . import __version__
from .api import DIALECTS
from .configfile import DEFAULT_CONFIG_PATH
from .states import RETRYABLE, STATES

if TYPE_CHECKING:
    # Subscripted only for the type checker: the running interpreter's class is not generic.
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]


def configure_logging(stream: TextIO = sys.stderr, level: int | None = None) -> None:
    """JSON lines for journald and pipes, readable coloured lines on a terminal; never the API key."""
    # Loaded here rather than at the top: `--help` needs none of them.
    import logging

    import structlog

    from .keys import redact, redact_values
    from .view import ProgressBar

    rendering: Any = (
        structlog.dev.ConsoleRenderer(colors=True, exception_formatter=structlog.dev.plain_traceback)
        if stream.isatty()
        else structlog.processors.JSONRenderer(sort_keys=False)
    )

    def scrub(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        # Before rendering too: JSON escapes a key holding " or \, and the escaped form would slip past.
        return {name: redact_values(value) for name, value in event.items()}

    def renderer(logger: Any, method: str, event: Any) -> str:
        bar = ProgressBar.active
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
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO if level is None else level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def _timestamp(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Local time with its UTC offset, so that a line means one moment wherever it is read."""
    event["timestamp"] = datetime.now().astimezone().isoformat(timespec="milliseconds")
    return event


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
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _daemon_commands(subcommands, common)
    _ledger_commands(subcommands, common)
    _tool_commands(subcommands, common)
    return parser


def _daemon_commands(subcommands: Subcommands, common: argparse.ArgumentParser) -> None:
    """The daemon itself."""
    run = subcommands.add_parser("run", parents=[common], help="watch and upload until SIGTERM or SIGINT")
    run.add_argument("--once", action="store_true", help="process what is there now, then exit")
    run.set_defaults(handler="runner.cmd_run")


def _ledger_commands(subcommands: Subcommands, common: argparse.ArgumentParser) -> None:
    """What a person does with the ledger while the daemon runs, or instead of it."""
    status = subcommands.add_parser("status", parents=[common], help="counts per state, uploads, pause, next retry")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true", help="redraw the view live until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    status.set_defaults(handler="commands.cmd_status")

    listing = subcommands.add_parser("list", parents=[common], help="the ledger's rows")
    listing.add_argument("--state", choices=[state.value for state in STATES])
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler="commands.cmd_list")

    retry = subcommands.add_parser(
        "retry", parents=[common], help="put files back in the queue; each is validated again, then uploaded"
    )
    retry.add_argument("--state", choices=[state.value for state in RETRYABLE], help="every file in this state")
    retry.add_argument("--all-failed", action="store_true", help="every failed file (the same as --state failed)")
    retry.add_argument("paths", nargs="*", metavar="PATH", help="these files; each is told what was done, and why")
    retry.set_defaults(handler="commands.cmd_retry")

    upload = subcommands.add_parser(
        "upload", parents=[common], help="upload files once, outside the daemon, with the same checks and ledger"
    )
    upload.add_argument("files", nargs="+", metavar="FILE")
    upload.add_argument("--unique-id", help="the memories.ai folder scope (default: the file's watched folder's)")
    upload.add_argument("--tag", action="append", default=[], help="a tag to add; repeat for more")
    upload.set_defaults(handler="runner.cmd_upload")

    resume = subcommands.add_parser(
        "resume", parents=[common], help="lift a pause of every upload now; after an account refusal, try one upload"
    )
    resume.set_defaults(handler="commands.cmd_resume")

    rebuilding = subcommands.add_parser(
        "rebuild",
        parents=[common],
        help="record as uploaded every file in the folders that list_videos shows memories.ai already holds",
    )
    rebuilding.add_argument("--dry-run", action="store_true", help="say what would be recorded, and record nothing")
    rebuilding.set_defaults(handler="runner.cmd_rebuild")


def _tool_commands(subcommands: Subcommands, common: argparse.ArgumentParser) -> None:
    """Checking and trying things out: the config and the key, one file's verdict, the API's emulator, the demo."""
    check = subcommands.add_parser(
        "check", parents=[common], help="validate the config, the ledger's place and the key, then exit"
    )
    check.add_argument(
        "--online",
        action="store_true",
        help="also ask the API, read-only, whether the key works (one list_videos call; never an upload)",
    )
    check.set_defaults(handler="runner.cmd_check")

    probing = subcommands.add_parser("probe", parents=[common], help="what validation says about one file")
    probing.add_argument("file")
    probing.add_argument("--require-audio", action="store_true")
    probing.set_defaults(handler="tryout.cmd_probe")

    sandbox = subcommands.add_parser("sandbox", parents=[common], help="run the local emulator of the API")
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
    sandbox.set_defaults(handler="tryout.cmd_sandbox")

    demo = subcommands.add_parser("demo", parents=[common], help="upload a sample video to a local sandbox")
    demo.set_defaults(handler="tryout.cmd_demo")


# Commands that only print: when what reads them goes away (`status | head`), they end quietly, as `cat` does.
PRINTING_COMMANDS = frozenset({"status", "list", "check", "probe", "retry", "resume"})
# Commands that load nothing that logs, so they need no logging set up (and no structlog loaded): a test holds
# them to it.
QUIET_COMMANDS = frozenset({"status", "list", "retry", "resume"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in PRINTING_COMMANDS:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.command not in QUIET_COMMANDS:
        configure_logging()
    # Each command's module is loaded only when it runs: `status` never pays for PyAV, requests or pydantic.
    module, _, function = args.handler.rpartition(".")
    handler = getattr(importlib.import_module(f".{module}", __package__), function)
    code: int = handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
