"""The memories.ai API as the vendor documents it: its paths, its answers in both dialects, and what each means.

The vendor documents two dialects. v1.2 answers HTTP 200 with a string ``code`` ("0000" is success); the newer
API answers with an integer ``code`` equal to the HTTP status (200 is success). The code decides. Only an answer
whose code is not documented is read by its words, and then only to recognise an account problem or a rate
limit, which keep the file: anything else the daemon cannot place is retried a few times and then failed with
the server's exact words. The sandbox speaks from the same table, so the two never drift apart.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["uploaded", "rate_limited", "transient", "account", "refused", "duplicate", "unrecognised"]
# Why the account refuses uploads; each pauses every upload until a trial upload is accepted.
Cause = Literal["key", "permission", "disabled", "balance", "indexing_cap"]

UPLOAD_PATH = "/serve/api/v1/upload"
LIST_PATH = "/serve/api/v1/list_videos"
# The vendor's limits for the upload form, which the config and the sandbox both check.
MAX_FILE_BYTES = 3 * 1024**3
MAX_TAGS = 20
MAX_CAMERA_MODEL = 200
MAX_CALLBACK = 299
CONTENT_TYPES = {
    ".avi": "video/x-msvideo",
    ".mkv": "video/x-matroska",
    ".mov": "video/quicktime",
    ".mp4": "video/mp4",
}
VIDEO_EXTENSIONS = tuple(CONTENT_TYPES)
LIST_RATE_PER_SECOND = 5.0
LIST_PAGE_SIZE = 100
# list_videos takes at most this many videoNos in one `video_nos` filter.
MAX_VIDEO_NOS = 100
# Without a unique_id, an upload goes to this scope, and list_videos lists it.
DEFAULT_SCOPE = "default"

V1 = "v1.2"
V2 = "v2"
DIALECTS = (V1, V2)


@dataclass(frozen=True)
class Meaning:
    """One documented answer: what it says, in the vendor's words, and what it means for the file."""

    name: str
    v1_code: str | None
    v2_code: int | None
    vendor_text: str
    kind: Kind
    cause: Cause | None = None
    # For a person: what happened and what to do about it.
    advice: str = ""


MEANINGS = (
    Meaning("success", "0000", 200, "success", "uploaded"),
    Meaning(
        "parameters",
        "0001",
        None,
        "One or more parameters are incorrect",
        "transient",
        advice="the vendor's own client retries 0001, so it is retried with backoff and never fails the file",
    ),
    Meaning("invalid", "0003", 400, "One or more parameters are incorrect", "refused"),
    Meaning("media", None, 415, "Unsupported media type", "refused"),
    Meaning(
        "bad_key",
        "0401",
        401,
        "Authorization is invalid or incorrect.",
        "account",
        "key",
        "the API key was refused: put the right key in api.api_key_file or the api.api_key_env variable",
    ),
    Meaning(
        "insufficient_balance",
        "0402",
        402,
        "You don't have enough points.",
        "account",
        "balance",
        "the account has no points left: top it up",
    ),
    Meaning(
        "disabled",
        "0403",
        403,
        "Developer account has been disabled.",
        "account",
        "disabled",
        "the developer account is disabled, or this host's address is not allowed: ask memories.ai",
    ),
    Meaning(
        "duplicate",
        "0409",
        409,
        "Duplicate requests are not allowed",
        "duplicate",
        advice="the server may already hold this upload: list_videos is asked before it is sent again",
    ),
    Meaning("rate_limited", "0429", 429, "Request has exceeded the limit.", "rate_limited"),
    Meaning(
        "permission_denied",
        "9009",
        None,
        "Permission denied.",
        "account",
        "permission",
        "the API denied permission to this key: check the key and what the account allows",
    ),
    Meaning("server_error", None, 500, "Internal server error", "transient"),
)
BY_NAME = {meaning.name: meaning for meaning in MEANINGS}
BY_V1_CODE = {meaning.v1_code: meaning for meaning in MEANINGS if meaning.v1_code}
BY_V2_CODE = {meaning.v2_code: meaning for meaning in MEANINGS if meaning.v2_code}

# The indexing cap exists (the upload page describes it) but has no documented code: it is known by its words.
INDEXING_CAP_ADVICE = "the account reached its indexing cap: uploads resume as earlier videos finish parsing"
_WORDS: tuple[tuple[Kind, Cause | None, re.Pattern[str], str], ...] = (
    ("rate_limited", None, re.compile(r"exceeded the limit|too busy|too many requests|rate.?limit", re.I), ""),
    (
        "account",
        "indexing_cap",
        # Not any "parse": "cannot parse the file" is about the file, and must not pause the whole account.
        re.compile(r"index|being parsed|parsing (queue|limit|cap)|concurren|unparsed", re.I),
        INDEXING_CAP_ADVICE,
    ),
    ("account", "balance", re.compile(r"balance|points|credit|recharge|quota|arrear|payment", re.I), ""),
    ("account", "key", re.compile(r"api[ _-]?key|apikey|unauthori[sz]ed|authori[sz]ation|token", re.I), ""),
    ("account", "disabled", re.compile(r"disabled|forbidden|suspended|banned", re.I), ""),
)


@dataclass(frozen=True)
class Outcome:
    """What one upload attempt came to. ``message`` is what was seen, with the server's exact words."""

    kind: Kind
    message: str
    video_no: str | None = None
    retry_after: float | None = None
    cause: Cause | None = None
    advice: str = ""
    # The API itself answered, so the body cannot have been stored: nothing to reconcile before sending again.
    answered: bool = False

    @property
    def reason(self) -> str:
        """For a pause: what to do, then what the server said."""
        return f"{self.advice} ({self.message})" if self.advice else self.message


def retry_after(value: str | None, now: float) -> float | None:
    """Retry-After in seconds, given as seconds or as an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    # Here, not at the top: the command line reads this module's dialects, and should not pay for the email package.
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def documented(code: object) -> Meaning | None:
    """The meaning of a code in either dialect: "0402" (v1.2) or 402 (the newer API); None when undocumented."""
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return BY_V2_CODE.get(code)
    if isinstance(code, str):
        if code in BY_V1_CODE:
            return BY_V1_CODE[code]
        if re.fullmatch(r"[1-5][0-9][0-9]", code):
            return BY_V2_CODE.get(int(code))
    return None


def _by_status(status: int) -> Meaning | None:
    """An answer without a code (an HTML error page from a proxy, an empty body): the HTTP status decides."""
    if status >= 500 or status in (408, 425):
        return BY_NAME["server_error"]
    if status == 413:
        return Meaning("too_large", None, 413, "Request Entity Too Large", "refused")
    return BY_V2_CODE.get(status) if status in (401, 402, 403, 429) else None


def classify(status: int, body: Any, headers: Mapping[str, str], now: float | None = None) -> Outcome:
    """What an answer to an upload means for the file and for the account."""
    now = time.time() if now is None else now
    wait = retry_after(headers.get("Retry-After"), now)
    code = body.get("code") if isinstance(body, dict) else None
    words = str(body.get("msg") or "") if isinstance(body, dict) else ""
    seen = f"HTTP {status}" + (f", code {code}" if code is not None else "") + (f": {words}" if words else "")
    # An undocumented code is read by its words, then by the HTTP status; without a code, the status decides.
    meaning = (documented(code) or _by_words(words) or _by_status(status)) if code is not None else _by_status(status)
    if meaning is None:
        return Outcome("unrecognised", seen, retry_after=wait, answered=True)
    if meaning.kind == "uploaded":
        data = body.get("data") if isinstance(body, dict) else None
        video_no = data.get("videoNo") if isinstance(data, dict) else None
        if video_no:
            return Outcome("uploaded", "success", video_no=str(video_no))
        return Outcome("transient", f"{seen}, but no videoNo in the answer")
    # A 5xx or a duplicate refusal may come after the body was stored; an unrecognised answer ends the attempt.
    answered = meaning.kind == "unrecognised" or (meaning.kind != "duplicate" and code is not None and status < 500)
    return Outcome(meaning.kind, seen, retry_after=wait, cause=meaning.cause, advice=meaning.advice, answered=answered)


def _by_words(words: str) -> Meaning | None:
    for kind, cause, pattern, advice in _WORDS:
        if pattern.search(words):
            if cause is not None and not advice:
                advice = next(m.advice for m in MEANINGS if m.cause == cause)
            return Meaning("by_words", None, None, words, kind, cause, advice)
    return None


def listing_succeeded(body: Any) -> bool:
    """Whether a list_videos answer is a success, in either dialect."""
    meaning = documented(body.get("code")) if isinstance(body, dict) else None
    return meaning is not None and meaning.kind == "uploaded"


# Indexing results. The vendor spells a failure three ways: PARSE_ERROR (the VideoStatus enum), FAILED (the
# list_videos table) and FAIL (the callback page).
PARSED = "PARSE"
NOT_PARSED = "UNPARSE"
PARSE_FAILURES = frozenset({"PARSE_ERROR", "FAILED", "FAIL"})


def indexing_result(status: object, cause: object) -> tuple[str, str | None] | None:
    """("indexed", None) or ("index_failed", cause) for a final status; None while there is no result yet.

    A cause of "null" (the string, as list_videos writes it) means no cause.
    """
    text = cause if isinstance(cause, str) and cause.strip() and cause.strip().lower() != "null" else None
    if status == PARSED:
        return "indexed", None
    if status in PARSE_FAILURES:
        return "index_failed", text
    return None
