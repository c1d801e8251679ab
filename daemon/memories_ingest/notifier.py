"""What the daemon tells systemd: ready, its status line, stopping, and the watchdog's pings while it is alive."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger()


def notify(message: str) -> bool:
    """Send one sd_notify datagram to $NOTIFY_SOCKET (a path, or an abstract socket written @name).

    False when there is no such socket (not started by systemd, or not Type=notify) or it cannot be reached.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between watchdog pings: half of WatchdogSec, as sd_watchdog_enabled() advises; None when off."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        pid = int(environ.get("WATCHDOG_PID", os.getpid()))
    except ValueError:
        return None
    # A watchdog meant for another process (our parent, say) leaked into our environment.
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2_000_000


class Notifier:
    """READY, STATUS, WATCHDOG and STOPPING for a Type=notify unit; each is a no-op when not under systemd."""

    def __init__(self, environ: Mapping[str, str] = os.environ, clock: Callable[[], float] = time.monotonic) -> None:
        self.watchdog_interval = _watchdog_interval(environ)
        self.clock = clock
        self._last_ping: float | None = None
        self._last_status: str | None = None
        self._withheld: list[str] = []

    def ready(self, status: str) -> None:
        self._last_status = status
        notify(f"READY=1\nSTATUS={status}")

    def status(self, line: str) -> None:
        if line != self._last_status:
            self._last_status = line
            notify(f"STATUS={line}")

    def watchdog(self, problems: Callable[[], list[str]]) -> None:
        """Ping when one is due, only while problems() finds none: a missed ping is how systemd learns of a stall."""
        now = self.clock()
        if self.watchdog_interval is None or (
            self._last_ping is not None and now - self._last_ping < self.watchdog_interval
        ):
            return
        found = problems()
        if found:
            if found != self._withheld:
                log.error("WATCHDOG WITHHELD: systemd restarts the service if this lasts", problems=found)
            self._withheld = found
            return
        if self._withheld:
            log.warning("healthy again; watchdog pings resume", were=self._withheld)
            self._withheld = []
        self._last_ping = now
        notify("WATCHDOG=1")

    @property
    def withheld(self) -> list[str]:
        """Why the watchdog pings are withheld now; empty while they go out."""
        return list(self._withheld)

    def stopping(self) -> None:
        notify("STOPPING=1\nSTATUS=stopping: letting uploads in flight finish")
