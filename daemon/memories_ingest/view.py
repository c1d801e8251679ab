"""What people are shown: the same words and the same escaping in `status`, `list`, the status page and systemd."""

from __future__ import annotations

import re

# C0 and C1 controls (escape sequences start with either), and the marks that reorder text on screen.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(value: object) -> str:
    """Text safe for a terminal or a page: a file name's bytes that are not UTF-8, and every control, as \\xNN.

    File names come from whoever can write to a watched folder; one named with an escape sequence must not
    move a cursor or recolour a terminal that runs `status`.
    """
    text = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _UNSAFE.sub(
        lambda match: f"\\x{ord(match[0]):02x}" if ord(match[0]) < 0x100 else f"\\u{ord(match[0]):04x}", text
    )
