"""A fast HTTP sink for the benchmarks: parses multipart uploads as a stream and throws the bytes away.

Run it as its own process (``python bench/sink.py [--port P]``); it prints the port it listens on, one line,
then serves until killed. Standard library only, so it starts fast and costs little:

- every connection gets a thread that ``recv_into``\\s one 4 MiB buffer and scans it for the multipart
  boundary with ``bytearray.find`` (C speed, no copies), counting each part's bytes;
- ``Expect: 100-continue`` (curl sends it for large bodies) is answered at once;
- every upload is answered like memories.ai does: ``{"code": "0000", "msg": "success", "data": {"videoNo": ...}}``;
- ``GET /stats`` returns, and forgets, one record per upload: when its first byte arrived and its body ended
  (``time.monotonic()``, comparable with other processes on this host), the body and file-part sizes, and the
  thread CPU seconds the sink spent on it, so the bench can check that the sink is faster than any client.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import threading
import time
from typing import Any

BLOCK = 4 << 20
MAX_HEAD = 64 << 10
UPLOAD_PATH = "/serve/api/v1/upload"

_records: list[dict[str, Any]] = []
_records_lock = threading.Lock()
_video_numbers = iter(range(1, 1 << 62))


class BadRequest(Exception):
    pass


class Connection:
    """One client connection: a reusable 4 MiB buffer and the bytes already read past the last request."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(BLOCK)
        self.view = memoryview(self.buf)
        self.have = 0  # bytes at the start of buf not yet consumed

    def fill(self, limit: int | None = None) -> int:
        space = BLOCK - self.have if limit is None else min(BLOCK - self.have, limit)
        if space <= 0:
            raise BadRequest("buffer full")
        n = self.sock.recv_into(self.view[self.have : self.have + space])
        self.have += n
        return n

    def consume(self, count: int) -> None:
        """Drop the first count bytes of the buffer, keeping the rest at its start."""
        rest = self.have - count
        if rest:
            # Through a copy: bytearray slice assignment from an overlapping view is a memcpy.
            self.buf[:rest] = bytes(self.view[count : self.have])
        self.have = rest

    def read_head(self) -> tuple[float, str, str, dict[str, str]] | None:
        arrived = time.monotonic() if self.have else None
        while True:
            end = self.buf.find(b"\r\n\r\n", 0, self.have)
            if end >= 0:
                break
            if self.have > MAX_HEAD:
                raise BadRequest("request head too long")
            if self.fill(MAX_HEAD) == 0:
                return None
            if arrived is None:
                arrived = time.monotonic()
        lines = bytes(self.view[:end]).decode("latin-1").split("\r\n")
        self.consume(end + 4)
        method, target, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        assert arrived is not None
        return arrived, method, target, headers

    def send_json(self, status: str, document: Any) -> None:
        body = json.dumps(document).encode()
        head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        self.sock.sendall(head.encode() + body)


class MultipartCounter:
    """Finds the parts of a multipart body as it streams past; keeps only each part's headers and size."""

    def __init__(self, boundary: bytes) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.parts: list[dict[str, Any]] = []
        self.closed = False
        self._open_part: dict[str, Any] | None = None
        self._part_start = 0

    def scan(self, data: bytearray, end: int, base: int, final: bool) -> int:
        """Scan data[:end], which starts at stream offset base; return how many bytes may be dropped.

        Bytes not returned as droppable are kept by the caller at the start of the next call's data.
        """
        delimiter = self.delimiter
        position = 0
        while not self.closed:
            found = data.find(delimiter, position, end)
            if found < 0:
                break
            after = found + len(delimiter)
            if end - after < 2 and not final:
                return found
            if data[after : after + 2] == b"--":
                self._close_part(base + found)
                self.closed = True
                return end
            head_end = data.find(b"\r\n\r\n", after, min(end, after + MAX_HEAD))
            if head_end < 0:
                if final or end - found > MAX_HEAD:
                    raise BadRequest("multipart part headers too long or cut short")
                return found
            self._close_part(base + found)
            headers = bytes(data[after + 2 : head_end]).decode("latin-1")
            self._open_part = {"headers": headers}
            self._part_start = base + head_end + 4
            position = head_end + 4
        if self.closed:
            return end
        return max(position, end - len(delimiter) + 1)

    def _close_part(self, stream_offset: int) -> None:
        if self._open_part is None:
            return
        part = self._open_part
        part["size"] = stream_offset - self._part_start
        self.parts.append(part)
        self._open_part = None


def receive_body(conn: Connection, length: int, boundary: bytes | None) -> MultipartCounter | None:
    """Read exactly length body bytes, scanning them for multipart parts when there is a boundary."""
    counter = MultipartCounter(boundary) if boundary else None
    # The stream the counter sees starts with CRLF, so the first delimiter looks like every other one.
    prefix = 2 if counter else 0
    if prefix:
        conn.buf[prefix : prefix + conn.have] = bytes(conn.view[: conn.have])
        conn.buf[:prefix] = b"\r\n"
        conn.have += prefix
    remaining = length - min(length, conn.have - prefix)
    extra = max(0, conn.have - prefix - length)  # bytes of a pipelined next request
    if extra:
        leftover = bytes(conn.view[conn.have - extra : conn.have])
        conn.have -= extra
    base = -prefix
    while True:
        final = remaining == 0
        done = counter.scan(conn.buf, conn.have, base, final) if counter is not None and conn.have else conn.have
        base += done
        conn.consume(done)
        if final:
            break
        n = conn.fill(remaining)
        if n == 0:
            raise BadRequest("the client closed the connection mid-body")
        remaining -= n
    conn.have = 0
    if extra:
        conn.buf[:extra] = leftover
        conn.have = extra
    return counter


def handle(sock: socket.socket) -> None:
    conn = Connection(sock)
    with sock:
        while True:
            try:
                head = conn.read_head()
                if head is None:
                    return
                arrived, method, target, headers = head
                cpu_start = time.thread_time()
                if target.startswith("/stats"):
                    with _records_lock:
                        records = list(_records)
                        _records.clear()
                    conn.send_json("200 OK", records)
                    continue
                if "content-length" not in headers:
                    conn.send_json("411 Length Required", {"code": "0411", "msg": "Content-Length required"})
                    return
                length = int(headers["content-length"])
                if headers.get("expect", "").lower() == "100-continue":
                    sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                content_type = headers.get("content-type", "")
                boundary = None
                if content_type.startswith("multipart/form-data"):
                    for option in content_type.split(";")[1:]:
                        key, _, value = option.strip().partition("=")
                        if key.lower() == "boundary":
                            boundary = value.strip('"').encode("latin-1")
                counter = receive_body(conn, length, boundary)
                done = time.monotonic()
                parts = counter.parts if counter else []
                file_parts = [p for p in parts if "filename=" in p["headers"]]
                record = {
                    "method": method,
                    "path": target,
                    "arrived": arrived,
                    "done": done,
                    "body_bytes": length,
                    "parts": len(parts),
                    "multipart_closed": bool(counter and counter.closed),
                    "file_bytes": file_parts[0]["size"] if file_parts else None,
                    "cpu": time.thread_time() - cpu_start,
                    "authorization": bool(headers.get("authorization")),
                }
                with _records_lock:
                    _records.append(record)
                video_no = f"VI{next(_video_numbers)}"
                data = {"videoNo": video_no, "videoName": video_no, "videoStatus": "UNPARSE"}
                data["uploadTime"] = str(int(time.time() * 1000))
                conn.send_json("200 OK", {"code": "0000", "msg": "success", "data": data})
                if headers.get("connection", "").lower() == "close":
                    return
            except (BadRequest, ValueError) as error:
                with contextlib.suppress(OSError):
                    conn.send_json("400 Bad Request", {"code": "0400", "msg": str(error)})
                return
            except OSError:
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = socket.create_server((args.host, args.port), backlog=128)
    print(server.getsockname()[1], flush=True)
    while True:
        client, _ = server.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(client,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
