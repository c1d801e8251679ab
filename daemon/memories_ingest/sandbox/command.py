"""The `memories-ingest sandbox` command: the sandbox in the foreground, at an upload rate given as text."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from types import FrameType

from .. import api
from .server import Sandbox, request_logger


def parse_rate(text: str) -> float:
    """An account's upload rate, per second: "1/s", "1/60s", "2/min", "1/h", or a number of uploads per second."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?)?\s*(s|sec|min|h))?\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a rate such as 1/s, 1/60s, 2/min or 0.5")
    count, span, unit = float(match[1]), float(match[2] or 1), match[3] or "s"
    seconds = span * {"s": 1, "sec": 1, "min": 60, "h": 3600}[unit]
    if count <= 0:
        raise ValueError(f"{text!r} allows no uploads at all")
    return count / seconds


def serve(
    host: str,
    port: int,
    api_key: str | None,
    *,
    dialect: str = api.V1,
    rate_per_second: float = 1.0,
) -> None:
    """Run the sandbox in the foreground until Ctrl-C or SIGTERM."""
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous_handler = signal.signal(signal.SIGTERM, request_stop)
    try:
        with Sandbox(
            host, port, api_key=api_key, dialect=dialect, rate_per_second=rate_per_second, log_requests=True
        ) as sandbox:
            request_logger().info(
                "sandbox_listening",
                url=sandbox.url,
                dialect=dialect,
                uploads_per_second=rate_per_second,
                api_key_required=api_key is not None,
            )
            with contextlib.suppress(KeyboardInterrupt):
                stop_requested.wait()
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
