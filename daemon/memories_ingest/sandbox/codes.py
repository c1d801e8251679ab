"""The answers the sandbox gives: every documented code, and codes of its own where the vendor has none."""

from __future__ import annotations

from dataclasses import dataclass

from .. import api


@dataclass(frozen=True)
class _Code:
    """How the sandbox answers one outcome: v1.2 code (on HTTP v1_status), newer-API code (also the status), text."""

    v1: str
    v2: int
    text: str
    v1_status: int = 200
    # The newer API's codes are HTTP statuses; only the sandbox's own need another.
    v2_status: int | None = None


def _documented(name: str, *, v1: str | None = None, v2: int | None = None) -> _Code:
    meaning = api.BY_NAME[name]
    return _Code(meaning.v1_code or v1 or "", meaning.v2_code or v2 or 0, meaning.vendor_text)


# Every documented answer, with stand-ins where one dialect has no code of its own for it.
CODES = {
    "success": _documented("success"),
    "parameters": _documented("parameters", v2=400),
    "invalid": _documented("invalid"),
    "media": _documented("media", v1="0003"),
    "bad_key": _documented("bad_key"),
    "insufficient_balance": _documented("insufficient_balance"),
    "disabled": _documented("disabled"),
    "duplicate": _documented("duplicate"),
    "rate_limited": _documented("rate_limited"),
    "permission_denied": _documented("permission_denied", v2=403),
    # The sandbox's own: the vendor documents no code for these.
    "indexing_cap": _Code("S001", 4001, "The number of videos being indexed has reached the limit", v2_status=400),
    "server_error": _Code("S500", 500, "Internal server error", v1_status=500),
    "not_found": _Code("S404", 404, "No such endpoint", v1_status=404),
    "method": _Code("S405", 405, "Method not allowed", v1_status=405),
}
ANSWER_NAMES = tuple(CODES)
