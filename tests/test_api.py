"""What the vendor's answers mean: every documented code, in both dialects, read directly and over real HTTP."""

from __future__ import annotations

import os
import threading
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from memories_ingest import api
from memories_ingest.api import Outcome, classify, indexing_result
from memories_ingest.sandbox import Sandbox
from memories_ingest.uploader import Client, SnapshotReader

from conftest import API_KEY

NOW = 1_000_000.0


def answer(status: int, code: Any = None, msg: str = "", headers: dict[str, str] | None = None) -> Outcome:
    body = None if code is None else {"code": code, "msg": msg, "data": None}
    if code in ("0000", 200):
        body = {"code": code, "msg": "success", "data": {"videoNo": "VI1"}}
    return classify(status, body, headers or {}, now=NOW)


# Every documented code: v1.2's on HTTP 200, the newer API's as the code and the status alike.
DOCUMENTED = [
    ("0000", 200, "uploaded", None),
    ("0001", None, "transient", None),
    ("0003", 400, "refused", None),
    (None, 415, "refused", None),
    ("0401", 401, "account", "key"),
    ("0402", 402, "account", "balance"),
    ("0403", 403, "account", "disabled"),
    ("0409", 409, "duplicate", None),
    ("0429", 429, "rate_limited", None),
    ("9009", None, "account", "permission"),
    (None, 500, "transient", None),
]


@pytest.mark.parametrize(("v1", "v2", "kind", "cause"), DOCUMENTED)
def test_every_documented_code_means_the_same_in_both_dialects(
    v1: str | None, v2: int | None, kind: str, cause: str | None
) -> None:
    if v1 is not None:
        seen = answer(200, v1, "the vendor's words")
        assert (seen.kind, seen.cause) == (kind, cause)
    if v2 is not None:
        seen = answer(v2, v2, "the vendor's words")
        assert (seen.kind, seen.cause) == (kind, cause)


def test_the_code_decides_not_the_words() -> None:
    # The documented empty-balance answer arrives on HTTP 200; its words match no pattern of the key.
    balance = answer(200, "0402", "You don't have enough points.")
    assert (balance.kind, balance.cause) == ("account", "balance")
    assert balance.reason.startswith("the account has no points left: top it up")
    assert "You don't have enough points." in balance.reason
    # Words that sound like a field problem do not refuse a file whose code says something else.
    assert answer(200, "0429", "invalid request: too many").kind == "rate_limited"
    assert answer(200, "0401", "datetime_taken must be ...").cause == "key"


@pytest.mark.parametrize(
    ("msg", "kind", "cause"),
    [
        ("The number of videos being indexed has reached the limit", "account", "indexing_cap"),
        ("Insufficient balance, please recharge", "account", "balance"),
        ("Invalid API key", "account", "key"),
        ("Request is too busy", "rate_limited", None),
        ("something nobody documented", "unrecognised", None),
        ("camera_model is too long", "unrecognised", None),
        ("cannot parse the file", "unrecognised", None),
    ],
)
def test_an_undocumented_code_is_read_by_its_words_and_only_to_keep_the_file(msg: str, kind: str, cause: str) -> None:
    seen = answer(200, "7777", msg)
    assert (seen.kind, seen.cause) == (kind, cause)
    assert msg in seen.message


@pytest.mark.parametrize(
    ("status", "kind", "cause"),
    [
        (401, "account", "key"),
        (402, "account", "balance"),
        (403, "account", "disabled"),
        (429, "rate_limited", None),
        (502, "transient", None),
        (503, "transient", None),
        (413, "refused", None),
        (404, "unrecognised", None),
    ],
)
def test_without_a_code_the_http_status_decides(status: int, kind: str, cause: str | None) -> None:
    seen = answer(status)
    assert (seen.kind, seen.cause) == (kind, cause)


def test_an_unknown_code_on_a_5xx_is_transient_and_may_have_landed() -> None:
    seen = answer(502, "S500", "Internal server error")
    assert seen.kind == "transient" and not seen.answered
    assert answer(200, "0001", "One or more parameters are incorrect").answered
    assert not answer(200, "0409", "Duplicate requests are not allowed").answered


def test_success_without_a_video_number_is_not_a_success() -> None:
    seen = classify(200, {"code": "0000", "msg": "success", "data": {}}, {}, now=NOW)
    assert seen.kind == "transient" and "no videoNo" in seen.message


def test_retry_after_in_seconds_and_as_a_date() -> None:
    assert answer(429, headers={"Retry-After": "7"}).retry_after == 7
    date = formatdate(NOW + 30, usegmt=True)
    assert answer(503, headers={"Retry-After": date}).retry_after == pytest.approx(30, abs=1)


@pytest.mark.parametrize(
    ("status", "cause", "result"),
    [
        ("PARSE", "null", ("indexed", None)),
        ("PARSE_ERROR", "no frames", ("index_failed", "no frames")),
        ("FAILED", "null", ("index_failed", None)),
        ("FAIL", None, ("index_failed", None)),
        ("UNPARSE", "null", None),
        ("PARSING", None, None),
    ],
)
def test_indexing_results_accept_every_spelling_of_a_failure(
    status: str, cause: str | None, result: tuple[str, str | None] | None
) -> None:
    assert indexing_result(status, cause) == result


def upload_once(sandbox: Sandbox, tmp_path: Path) -> Outcome:
    path = tmp_path / "v.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(4084))
    fd = os.open(path, os.O_RDONLY)
    client = Client(sandbox.url, API_KEY, connect_timeout=2, read_timeout=5)
    try:
        reader = SnapshotReader(fd, os.fstat(fd), str(path), threading.Event())
        return client.upload(reader, "v.mp4", "video/mp4", [("unique_id", "u")])
    finally:
        os.close(fd)
        client.close()


# The newer API has no code of its own for 0001 or 9009: the sandbox answers 400 and 403 for them there.
IN_V2 = {"parameters": ("refused", None), "permission_denied": ("account", "disabled")}
SANDBOX_ANSWERS = [
    ("parameters", "transient", None),
    ("invalid", "refused", None),
    ("media", "refused", None),
    ("bad_key", "account", "key"),
    ("insufficient_balance", "account", "balance"),
    ("disabled", "account", "disabled"),
    ("permission_denied", "account", "permission"),
    ("duplicate", "duplicate", None),
    ("rate_limited", "rate_limited", None),
    ("indexing_cap", "account", "indexing_cap"),
    ("server_error", "transient", None),
]


@pytest.mark.parametrize("dialect", api.DIALECTS)
@pytest.mark.parametrize(("name", "kind", "cause"), SANDBOX_ANSWERS)
def test_the_client_understands_every_answer_the_sandbox_gives_in_each_dialect(
    tmp_path: Path, dialect: str, name: str, kind: str, cause: str | None
) -> None:
    with Sandbox(api_key=API_KEY, dialect=dialect, rate_per_second=100) as sandbox:
        sandbox.inject("answer", name=name)
        refused = upload_once(sandbox, tmp_path)
        accepted = upload_once(sandbox, tmp_path)
    if dialect == api.V2:
        kind, cause = IN_V2.get(name, (kind, cause))
    assert (refused.kind, refused.cause) == (kind, cause), refused
    assert accepted.kind == "uploaded" and accepted.video_no


@pytest.mark.parametrize("dialect", api.DIALECTS)
def test_the_sandbox_speaks_the_vendors_words_in_each_dialect(tmp_path: Path, dialect: str) -> None:
    with Sandbox(api_key=API_KEY, dialect=dialect, rate_per_second=100) as sandbox:
        sandbox.set_account("insufficient_balance")
        refused = upload_once(sandbox, tmp_path)
        (record,) = sandbox.requests()
    assert "You don't have enough points." in refused.message
    if dialect == api.V1:
        assert (record.http_status, record.code) == (200, "0402")
    else:
        assert (record.http_status, record.code) == (402, "402")
