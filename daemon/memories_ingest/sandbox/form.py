"""The upload's multipart body, streamed and hashed rather than held, and the documented rules it must meet."""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import IO, TYPE_CHECKING, Any, cast

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import MultiPartParser
from werkzeug.http import parse_options_header
from werkzeug.wsgi import get_content_length

from .. import api

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

_READ_SIZE = 1024 * 1024
# Text fields are buffered by the parser, so they get a cap; the file part is streamed. werkzeug also
# applies the cap to each read plus its leftover buffer, so it must stay well above _READ_SIZE.
_MAX_FIELD_BYTES = 4 * _READ_SIZE
_MAX_FORM_PARTS = 1000
_DATETIME_TAKEN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")

Fields = dict[str, list[str]]


class InvalidUpload(Exception):
    pass


class FilePart:
    """Takes the place of the parser's temporary file: the part is hashed and counted, then dropped."""

    def __init__(self, filename: str | None, content_type: str | None) -> None:
        self.filename = filename or ""
        self.content_type = content_type or ""
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        self.size += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def _sink_factory(
    total_content_length: int | None,
    content_type: str | None,
    filename: str | None,
    content_length: int | None = None,
) -> IO[bytes]:
    return cast(IO[bytes], FilePart(filename, content_type))


def drain(stream: IO[bytes], limit: float = math.inf) -> None:
    remaining = limit
    while remaining > 0 and (chunk := stream.read(int(min(_READ_SIZE, remaining)))):
        remaining -= len(chunk)


def read_at_most(stream: IO[bytes], limit: int) -> bytes:
    data = bytearray()
    while len(data) < limit and (chunk := stream.read(limit - len(data))):
        data += chunk
    return bytes(data)


def parse_form(environ: WSGIEnvironment, stream: IO[bytes]) -> tuple[Fields, dict[str, list[FilePart]]]:
    mimetype, options = parse_options_header(environ.get("CONTENT_TYPE"))
    if mimetype != "multipart/form-data":
        raise InvalidUpload("the request must be multipart/form-data")
    boundary = options.get("boundary", "")
    if not boundary:
        raise InvalidUpload("the multipart/form-data boundary is missing")
    parser = MultiPartParser(
        stream_factory=_sink_factory,
        max_form_memory_size=_MAX_FIELD_BYTES,
        buffer_size=_READ_SIZE,
        max_form_parts=_MAX_FORM_PARTS,
    )
    try:
        form, files = parser.parse(stream, boundary.encode("latin-1"), get_content_length(environ))
    except ValueError as error:
        raise InvalidUpload(f"malformed multipart body: {error}") from error
    except RequestEntityTooLarge as error:
        raise InvalidUpload(
            f"a form field exceeds {_MAX_FIELD_BYTES} bytes or the form has over {_MAX_FORM_PARTS} parts"
        ) from error
    # Every file part's stream is the FilePart that _sink_factory made for it.
    parts = {name: [cast(FilePart, storage.stream) for storage in files.getlist(name)] for name in files}
    return form.to_dict(flat=False), parts


def _is_datetime_taken(value: str) -> bool:
    try:
        return bool(_DATETIME_TAKEN.fullmatch(value)) and bool(datetime.strptime(value, "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        return False


def _is_decimal_within(value: str, bound: float) -> bool:
    return bool(_DECIMAL.fullmatch(value)) and -bound <= float(value) <= bound


def _is_boolean(value: str) -> bool:
    return value.lower() in {"true", "false", "1", "0"}


_FIELD_RULES: dict[str, tuple[Callable[[str], bool], str]] = {
    "unique_id": (lambda value: bool(value.strip()), "unique_id must not be empty"),
    "datetime_taken": (_is_datetime_taken, "datetime_taken must be yyyy-MM-dd HH:mm:ss"),
    "latitude": (partial(_is_decimal_within, bound=90), "latitude must be a decimal number in [-90, 90]"),
    "longitude": (
        partial(_is_decimal_within, bound=180),
        "longitude must be a decimal number in [-180, 180]",
    ),
    "camera_model": (
        lambda value: len(value) <= api.MAX_CAMERA_MODEL,
        f"camera_model must be at most {api.MAX_CAMERA_MODEL} characters",
    ),
    "callback": (
        lambda value: len(value) <= api.MAX_CALLBACK,
        f"callback must be at most {api.MAX_CALLBACK} characters",
    ),
    "retain_original_video": (_is_boolean, "retain_original_video must be true or false"),
}


def upload_problem(fields: Fields, files: dict[str, list[FilePart]], max_file_bytes: int) -> tuple[str, str] | None:
    """What is wrong with an upload, if anything: the answer's name ("invalid" or "media") and the detail."""
    if "file" in fields:
        return "invalid", "file must be sent as a file part, with a filename"
    strays = sorted(set(files) - {"file"})
    if strays:
        return "invalid", f"unexpected file part(s) {', '.join(strays)}: only 'file' may carry a file"
    parts = files.get("file", [])
    if not parts:
        return "invalid", "file is required"
    if len(parts) > 1:
        return "invalid", "exactly one file part is allowed"
    part = parts[0]
    if os.path.splitext(part.filename)[1].lower() not in api.VIDEO_EXTENSIONS:
        return "media", f"file extension must be one of {', '.join(api.VIDEO_EXTENSIONS)} (got {part.filename!r})"
    if not part.content_type.lower().startswith("video/"):
        return "media", f"file Content-Type must start with video/ (got {part.content_type!r})"
    if part.size == 0:
        return "invalid", "file must not be empty"
    if part.size > max_file_bytes:
        return "invalid", f"file must be at most {max_file_bytes} bytes (got {part.size})"
    if len(fields.get("tags", [])) > api.MAX_TAGS:
        return "invalid", f"at most {api.MAX_TAGS} tags are allowed"
    for name, (is_valid, problem) in _FIELD_RULES.items():
        if not all(is_valid(value) for value in fields.get(name, [])):
            return "invalid", problem
    return None


def positive_int(value: Any) -> int | None:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None
