"""The sandbox's sockets: tracked so stop() can cut them, reset on an abort, and read slowly on a trickle."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import IO

from werkzeug.serving import WSGIRequestHandler


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
