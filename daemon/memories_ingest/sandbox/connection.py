"""The sandbox's sockets: tracked so stop() can cut them, reset on an abort, and read slowly on a trickle."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import IO, TYPE_CHECKING

from werkzeug.serving import WSGIRequestHandler

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

# Linux's value: Python's socket module does not name it.
SO_TIMESTAMPNS = 35
# Where the WSGI app finds the moment a request's first byte reached this host.
FIRST_BYTE_KEY = "sandbox.first_byte_at"


def stamp_arrivals(server_socket: socket.socket) -> None:
    """Have the kernel stamp each byte as it arrives; accepted connections inherit it."""
    with contextlib.suppress(OSError):
        server_socket.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


def first_byte_at(connection: socket.socket) -> float | None:
    """When the next request's first byte reached this host, on the time.monotonic() clock; None if unknown.

    The kernel's stamp, not the moment a thread got round to it: on a busy host a handler thread may run tens
    of milliseconds late, and the rate window must count what arrived when, as the real server does.
    """
    try:
        data, ancillary, _, _ = connection.recvmsg(1, socket.CMSG_SPACE(16), socket.MSG_PEEK)
    except OSError:
        return None
    for level, kind, payload in ancillary:
        if data and level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= 16:
            seconds, nanoseconds = struct.unpack("qq", payload[:16])
            stamped: float = seconds + nanoseconds / 1e9
            return time.monotonic() - (time.time() - stamped)
    return None


class AbortConnection(BaseException):
    """Ends the connection without an answer (a BaseException: werkzeug answers 500 to an Exception)."""


def request_handler(connections: set[socket.socket], lock: threading.Lock) -> type[WSGIRequestHandler]:
    class SandboxRequestHandler(WSGIRequestHandler):
        def setup(self) -> None:
            super().setup()
            with lock:
                connections.add(self.connection)

        def finish(self) -> None:
            with lock:
                connections.discard(self.connection)
            super().finish()

        def handle_one_request(self) -> None:
            self.first_byte_at = first_byte_at(self.connection)
            super().handle_one_request()

        def make_environ(self) -> WSGIEnvironment:
            environ = super().make_environ()
            environ[FIRST_BYTE_KEY] = self.first_byte_at
            return environ

        def run_wsgi(self) -> None:
            try:
                super().run_wsgi()
            except AbortConnection:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    # A zero linger makes close() send RST rather than FIN, as a dropped proxy does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # The buffered reader holds a reference that would keep the socket open past close().
                self.rfile.close()
                self.connection.close()

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            """Silenced: the sandbox writes its own, richer line per request."""

    return SandboxRequestHandler


class Trickle:
    """A request body read at no more than `bytes_per_second`: a slow uplink, as the server sees it."""

    def __init__(self, stream: IO[bytes], bytes_per_second: float, stopping: threading.Event) -> None:
        self._stream = stream
        self._rate = bytes_per_second
        self._stopping = stopping
        self._started = time.monotonic()
        self._read = 0

    def read(self, size: int = -1) -> bytes:
        chunk = max(1, int(self._rate / 10))
        data = self._stream.read(chunk if size < 0 else min(size, chunk))
        self._read += len(data)
        self._stopping.wait(max(0.0, self._started + self._read / self._rate - time.monotonic()))
        return data
