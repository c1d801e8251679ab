"""The sandbox over real loopback HTTP, driven the way the daemon drives the real API."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import structlog.testing
from requests_toolbelt import MultipartEncoder

from memories_ingest.sandbox import LIST_PATH, UPLOAD_PATH, Sandbox, serve

from conftest import wait_until

API_KEY = "test-key"
Fields = Sequence[tuple[str, str]]


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(api_key=API_KEY, rate_per_second=1000, list_rate_per_second=1000, parse_seconds=0.2) as running:
        yield running


@pytest.fixture
def video(tmp_path: Path) -> Path:
    path = tmp_path / "clip.mp4"
    path.write_bytes(os.urandom(64 * 1024))
    return path


def upload(
    sandbox: Sandbox,
    files: Sequence[tuple[str, Path, str, str]] = (),
    fields: Fields = (),
    api_key: str | None = API_KEY,
    timeout: float = 5.0,
) -> requests.Response:
    """POST a streamed multipart upload; each file is (part name, path, filename, content type)."""
    with contextlib.ExitStack() as stack:
        parts: list[tuple[str, Any]] = list(fields)
        for part_name, path, filename, content_type in files:
            parts.append((part_name, (filename, stack.enter_context(path.open("rb")), content_type)))
        encoder = MultipartEncoder(fields=parts)
        headers = {"Content-Type": encoder.content_type}
        if api_key is not None:
            headers["Authorization"] = api_key
        return requests.post(sandbox.url + UPLOAD_PATH, data=encoder, headers=headers, timeout=timeout)


def upload_video(sandbox: Sandbox, path: Path, fields: Fields = (), **options: Any) -> requests.Response:
    return upload(sandbox, [("file", path, path.name, "video/mp4")], fields, **options)


def list_videos(sandbox: Sandbox, api_key: str = API_KEY, **query: Any) -> dict[str, Any]:
    response = requests.post(sandbox.url + LIST_PATH, json=query, headers={"Authorization": api_key}, timeout=5)
    body: dict[str, Any] = response.json()
    return body


def test_accepted_upload_answers_like_the_api_and_records_the_file(sandbox: Sandbox, video: Path) -> None:
    before_ms = int(time.time() * 1000)
    response = upload_video(sandbox, video, [("unique_id", "cam-1"), ("tags", "a"), ("tags", "b")])

    assert response.status_code == 200
    body = response.json()
    assert (body["code"], body["msg"]) == ("0000", "success")
    data = body["data"]
    assert re.fullmatch(r"VI[0-9]{18}", data["videoNo"])
    assert re.fullmatch(r"[0-9a-f]{32}", data["videoName"])
    assert data["videoStatus"] == "UNPARSE"
    assert before_ms <= int(data["uploadTime"]) <= int(time.time() * 1000)

    [received] = sandbox.received()
    assert received.video_no == data["videoNo"]
    assert (received.filename, received.content_type) == ("clip.mp4", "video/mp4")
    assert received.size == video.stat().st_size
    assert received.sha256 == hashlib.sha256(video.read_bytes()).hexdigest()
    assert received.unique_id == "cam-1"
    assert received.tags == ["a", "b"]
    assert sandbox.requests()[0].code == "0000"


def test_large_upload_is_hashed_across_many_reads(sandbox: Sandbox, tmp_path: Path) -> None:
    path = tmp_path / "big.mp4"
    path.write_bytes(os.urandom(5 * 1024 * 1024 + 17))

    assert upload_video(sandbox, path).json()["code"] == "0000"
    [received] = sandbox.received()
    assert (received.size, received.sha256) == (
        path.stat().st_size,
        hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def test_video_numbers_are_unique(sandbox: Sandbox, video: Path) -> None:
    numbers = {upload_video(sandbox, video).json()["data"]["videoNo"] for _ in range(5)}
    assert len(numbers) == 5


def test_accepts_every_value_at_the_edge_of_the_rules(sandbox: Sandbox, tmp_path: Path) -> None:
    path = tmp_path / "CLIP.MOV"
    path.write_bytes(b"\x00" * 10)
    fields = [
        ("unique_id", "x"),
        ("datetime_taken", "2024-02-29 23:59:59"),
        ("latitude", "-90"),
        ("longitude", "180.0"),
        ("camera_model", "c" * 200),
        ("retain_original_video", "TRUE"),
        ("video_transcription_prompt", "focus on people"),
        *[("tags", f"t{index}") for index in range(20)],
    ]
    response = upload(sandbox, [("file", path, path.name, "video/quicktime")], fields)

    assert response.json()["code"] == "0000"
    assert len(sandbox.received()[0].tags) == 20


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ([("unique_id", "")], "unique_id must not be empty"),
        ([("unique_id", "  ")], "unique_id must not be empty"),
        ([("datetime_taken", "2025-10-20T11:00:00")], "datetime_taken must be yyyy-MM-dd HH:mm:ss"),
        ([("datetime_taken", "2025-10-20 11:00")], "datetime_taken must be yyyy-MM-dd HH:mm:ss"),
        ([("datetime_taken", "2025-02-30 11:00:00")], "datetime_taken must be yyyy-MM-dd HH:mm:ss"),
        ([("latitude", "north")], "latitude must be a decimal number"),
        ([("latitude", "90.5")], "latitude must be a decimal number"),
        ([("longitude", "-180.01")], "longitude must be a decimal number"),
        ([("longitude", "1e2")], "longitude must be a decimal number"),
        ([("tags", f"t{index}") for index in range(21)], "at most 20 tags are allowed"),
        ([("camera_model", "c" * 201)], "camera_model must be at most 200 characters"),
        ([("callback", "http://example.invalid/" + "p" * 277)], "callback must be at most 299 characters"),
        ([("retain_original_video", "yes")], "retain_original_video must be true or false"),
    ],
)
def test_rejects_invalid_fields(sandbox: Sandbox, video: Path, fields: Fields, reason: str) -> None:
    response = upload_video(sandbox, video, fields)

    assert response.status_code == 200
    assert response.json()["code"] == "0003"
    assert reason in response.json()["msg"]
    assert response.json()["msg"].startswith("One or more parameters are incorrect")
    assert sandbox.received() == []


@pytest.mark.parametrize(
    ("part_name", "filename", "content_type", "payload", "reason"),
    [
        ("file", "clip.mp4", "video/mp4", b"", "file must not be empty"),
        ("file", "clip.txt", "video/mp4", b"data", "file extension must be one of"),
        ("file", "clip", "video/mp4", b"data", "file extension must be one of"),
        ("file", "clip.mp4", "application/octet-stream", b"data", "Content-Type must start with video/"),
        ("video", "clip.mp4", "video/mp4", b"data", "unexpected file part(s) video"),
    ],
)
def test_rejects_invalid_file_parts(
    sandbox: Sandbox,
    tmp_path: Path,
    part_name: str,
    filename: str,
    content_type: str,
    payload: bytes,
    reason: str,
) -> None:
    path = tmp_path / "payload"
    path.write_bytes(payload)

    response = upload(sandbox, [(part_name, path, filename, content_type)])

    assert response.json()["code"] == "0003"
    assert reason in response.json()["msg"]


def test_requires_exactly_one_file_part(sandbox: Sandbox, video: Path) -> None:
    missing = upload(sandbox, fields=[("unique_id", "x")])
    as_plain_field = upload(sandbox, fields=[("file", "not a file")])
    twice = upload(sandbox, [("file", video, "a.mp4", "video/mp4"), ("file", video, "b.mp4", "video/mp4")])

    assert missing.json()["msg"].endswith(": file is required")
    assert "file must be sent as a file part" in as_plain_field.json()["msg"]
    assert twice.json()["msg"].endswith(": exactly one file part is allowed")
    assert sandbox.received() == []


def test_rejects_a_body_that_is_not_multipart(sandbox: Sandbox) -> None:
    response = requests.post(sandbox.url + UPLOAD_PATH, json={"file": "x"}, headers={"Authorization": API_KEY})

    assert response.json() == {
        "code": "0003",
        "msg": "One or more parameters are incorrect: the request must be multipart/form-data",
        "data": None,
    }


def test_rejects_a_file_over_the_size_limit(video: Path) -> None:
    with Sandbox(api_key=API_KEY, max_file_bytes=1000) as small:
        response = upload_video(small, video)

    assert response.json()["code"] == "0003"
    assert "file must be at most 1000 bytes" in response.json()["msg"]


@pytest.mark.parametrize("api_key", [None, "wrong-key", ""])
def test_rejects_a_missing_or_wrong_key(sandbox: Sandbox, video: Path, api_key: str | None) -> None:
    response = upload_video(sandbox, video, api_key=api_key)

    assert response.status_code == 200
    assert response.json()["code"] == "0401"
    assert response.json()["msg"] == "Authorization is invalid or incorrect."


def test_without_a_configured_key_any_non_empty_key_is_accepted(video: Path) -> None:
    with Sandbox(rate_per_second=100) as open_sandbox:
        assert upload_video(open_sandbox, video, api_key="anything").json()["code"] == "0000"
        assert upload_video(open_sandbox, video, api_key=None).json()["code"] == "0401"


def test_rate_limit_counts_every_arrival_in_a_sliding_second(video: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=1) as strict:
        first = upload_video(strict, video)
        second = upload_video(strict, video)
        time.sleep(1.05)
        third = upload_video(strict, video)

        assert first.json()["code"] == "0000"
        assert second.status_code == 200
        assert second.json() == {"code": "0429", "msg": "Request has exceeded the limit.", "data": None}
        assert third.json()["code"] == "0000"
        assert [record.code for record in strict.requests()] == ["0000", "0429", "0000"]
        assert len(strict.received()) == 2


def test_rate_limit_admits_up_to_the_rate_per_second(video: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=2) as sandbox:
        codes = [upload_video(sandbox, video).json()["code"] for _ in range(3)]

    assert codes == ["0000", "0000", "0429"]


def test_rate_limit_fault_can_answer_429_with_retry_after(sandbox: Sandbox, video: Path) -> None:
    sandbox.inject("rate_limit", http_status=429, retry_after="3")
    sandbox.inject("rate_limit")

    limited_429 = upload_video(sandbox, video)
    limited_200 = upload_video(sandbox, video)

    assert (limited_429.status_code, limited_429.headers["Retry-After"]) == (429, "3")
    assert limited_429.json()["code"] == "0429"
    assert (limited_200.status_code, limited_200.json()["code"]) == (200, "0429")
    assert "Retry-After" not in limited_200.headers
    assert sandbox.received() == []


def test_server_error_fault_answers_json_or_html(sandbox: Sandbox, video: Path) -> None:
    sandbox.inject("server_error")
    sandbox.inject("server_error", status=502, html=True)

    as_json = upload_video(sandbox, video)
    as_html = upload_video(sandbox, video)

    assert (as_json.status_code, as_json.json()["code"]) == (500, "S500")
    assert as_html.status_code == 502
    assert as_html.headers["Content-Type"].startswith("text/html")
    assert "502 Bad Gateway" in as_html.text
    assert upload_video(sandbox, video).json()["code"] == "0000"


@pytest.mark.parametrize("params", [{}, {"after_bytes": 100}])
def test_reset_fault_breaks_the_connection(sandbox: Sandbox, video: Path, params: dict[str, Any]) -> None:
    sandbox.inject("reset", **params)

    with pytest.raises(requests.ConnectionError):
        upload_video(sandbox, video)

    assert sandbox.received() == []
    assert [(record.http_status, record.code) for record in sandbox.requests()] == [(0, None)]
    assert upload_video(sandbox, video).json()["code"] == "0000"


def test_slow_fault_makes_the_client_time_out_without_accepting(sandbox: Sandbox, video: Path) -> None:
    sandbox.inject("slow", seconds=2)

    with pytest.raises(requests.ReadTimeout):
        upload_video(sandbox, video, timeout=0.3)

    assert sandbox.received() == []


def test_slow_fault_can_accept_an_upload_whose_answer_the_client_never_sees(sandbox: Sandbox, video: Path) -> None:
    sandbox.inject("slow", seconds=2, accept=True)

    with pytest.raises(requests.ReadTimeout):
        upload_video(sandbox, video, fields=[("unique_id", "uncertain")], timeout=0.3)

    [received] = sandbox.received()
    listed = list_videos(sandbox, unique_id="uncertain")["data"]["videos"]
    assert [(entry["video_name"], entry["size"]) for entry in listed] == [(received.video_name, str(received.size))]


def test_slow_answer_after_the_stall_is_a_gateway_timeout(sandbox: Sandbox, video: Path) -> None:
    sandbox.inject("slow", seconds=0.3)

    started = time.monotonic()
    response = upload_video(sandbox, video)

    assert time.monotonic() - started >= 0.3
    assert (response.status_code, response.json()["code"]) == (504, "S500")


def test_requests_are_served_concurrently(video: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=100) as running:
        running.inject("slow", seconds=30)
        stalled = threading.Thread(target=upload_video, args=(running, video), kwargs={"timeout": 60})
        stalled.start()
        wait_until(lambda: running.faults_pending() == 0, what="the first request to meet the stall")
        assert upload_video(running, video).json()["code"] == "0000"
        assert stalled.is_alive(), "the second request was answered while the first still stalled"
    stalled.join(timeout=30)


def test_stop_is_prompt_while_a_request_stalls(video: Path) -> None:
    running = Sandbox(api_key=API_KEY).start()
    running.inject("slow", seconds=30)
    outcome: list[object] = []

    def stalled_upload() -> None:
        try:
            outcome.append(upload_video(running, video, timeout=60).status_code)
        except requests.RequestException as error:
            outcome.append(error)

    client = threading.Thread(target=stalled_upload)
    client.start()
    wait_until(lambda: running.faults_pending() == 0, what="the request to meet the stall")
    running.stop()
    # Far short of the 30 s stall and the client's 60 s timeout: stop() cut the connection.
    client.join(timeout=20)
    assert not client.is_alive() and outcome


@pytest.mark.parametrize(
    ("state", "code", "msg"),
    [
        ("insufficient_balance", "0402", "You don't have enough points."),
        ("disabled", "0403", "Developer account has been disabled."),
        ("permission_denied", "9009", "Permission denied."),
        ("bad_key", "0401", "Authorization is invalid or incorrect."),
        ("indexing_cap", "S001", "The number of videos being indexed has reached the limit"),
    ],
)
def test_account_states_persist_until_reset_and_faults_fire_once(
    sandbox: Sandbox, video: Path, state: str, code: str, msg: str
) -> None:
    sandbox.set_account(state)
    persistent = [upload_video(sandbox, video) for _ in range(2)]
    sandbox.set_account("ok")
    sandbox.inject(state)
    one_shot = upload_video(sandbox, video)
    after = upload_video(sandbox, video)

    for response in [*persistent, one_shot]:
        assert response.status_code == 200
        assert (response.json()["code"], response.json()["msg"]) == (code, msg)
    assert after.json()["code"] == "0000"
    assert len(sandbox.received()) == 1


def test_the_newer_dialect_answers_with_integer_codes_equal_to_the_http_status(video: Path) -> None:
    with Sandbox(api_key=API_KEY, dialect="v2", rate_per_second=1000) as newer:
        accepted = upload_video(newer, video)
        newer.set_account("insufficient_balance")
        refused = upload_video(newer, video)
        newer.set_account("ok")
        listed = list_videos(newer)

    assert (accepted.status_code, accepted.json()["code"]) == (200, 200)
    assert refused.status_code == 402
    assert refused.json() == {"code": 402, "msg": "You don't have enough points.", "data": None}
    assert listed["code"] == 200 and len(listed["data"]["videos"]) == 1


def test_a_duplicate_refusal_can_come_after_the_video_was_stored(sandbox: Sandbox, video: Path) -> None:
    sandbox.inject("answer", name="duplicate", landed=True)
    response = upload_video(sandbox, video, [("unique_id", "dup")])

    assert response.json()["code"] == "0409"
    assert response.json()["msg"] == "Duplicate requests are not allowed"
    assert len(list_videos(sandbox, unique_id="dup")["data"]["videos"]) == 1


def test_a_trickle_reads_the_body_slowly_and_then_accepts_it(sandbox: Sandbox, tmp_path: Path) -> None:
    path = tmp_path / "slow.mp4"
    path.write_bytes(os.urandom(200 * 1024))
    sandbox.inject("trickle", bytes_per_second=400 * 1024)
    started = time.monotonic()
    assert upload_video(sandbox, path).json()["code"] == "0000"
    assert time.monotonic() - started >= 0.45
    assert sandbox.received()[0].size == 200 * 1024


def test_an_account_may_allow_far_fewer_uploads_than_one_a_second(video: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=1 / 60) as slow:
        codes = [upload_video(slow, video).json()["code"] for _ in range(3)]
    assert codes == ["0000", "0429", "0429"]


def test_invalid_field_fault_uses_the_given_message(sandbox: Sandbox, video: Path) -> None:
    sandbox.inject("invalid_field", msg="tags must be strings")

    assert upload_video(sandbox, video).json() == {
        "code": "0003",
        "msg": "One or more parameters are incorrect: tags must be strings",
        "data": None,
    }


def test_faults_apply_the_given_number_of_times_and_can_be_cleared(sandbox: Sandbox, video: Path) -> None:
    sandbox.inject("server_error", times=2)
    assert [upload_video(sandbox, video).status_code for _ in range(3)] == [500, 500, 200]

    sandbox.inject("server_error", times=5)
    sandbox.clear_faults()
    assert upload_video(sandbox, video).status_code == 200


def test_rejects_unknown_faults_params_and_account_states(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        sandbox.inject("meteor")
    with pytest.raises(ValueError, match="takes no parameter"):
        sandbox.inject("reset", seconds=3)
    with pytest.raises(ValueError, match="unknown account state"):
        sandbox.set_account("bankrupt")


def test_list_filters_pages_and_orders_newest_first(sandbox: Sandbox, tmp_path: Path) -> None:
    uploaded = []
    for index, unique_id in enumerate(["cam-1", None, "cam-1"]):
        path = tmp_path / f"clip{index}.mp4"
        path.write_bytes(b"v" * (index + 1))
        fields = [("unique_id", unique_id)] if unique_id else []
        uploaded.append(upload_video(sandbox, path, fields).json()["data"]["videoNo"])

    by_unique_id = list_videos(sandbox, unique_id="cam-1")["data"]
    default_scope = list_videos(sandbox)["data"]
    by_video_no = list_videos(sandbox, video_no=uploaded[1])["data"]
    by_video_nos = list_videos(sandbox, unique_id="cam-1", video_nos=[uploaded[0], uploaded[1]])["data"]
    second_page = list_videos(sandbox, unique_id="cam-1", page=2, size=1)["data"]

    assert [entry["video_no"] for entry in by_unique_id["videos"]] == [uploaded[2], uploaded[0]]
    assert by_unique_id["total_count"] == "2"
    [entry] = default_scope["videos"]
    assert entry["video_no"] == uploaded[1] and entry["unique_id"] == "default"
    assert [entry["video_no"] for entry in by_video_no["videos"]] == [uploaded[1]]
    assert [entry["video_no"] for entry in by_video_nos["videos"]] == [uploaded[0]]
    assert re.fullmatch(r"[0-9a-f]{32}", entry["video_name"]), "the server names videos itself"
    assert (entry["size"], entry["duration"], entry["cause"]) == ("2", "0", "null")
    assert entry["status"] in {"UNPARSE", "PARSE"}
    assert abs(int(entry["create_time"]) - time.time() * 1000) < 10_000
    assert (second_page["current_page"], second_page["total_count"]) == (2, "2")
    assert [entry["video_no"] for entry in second_page["videos"]] == [uploaded[0]]


def test_tags_are_listed_and_filter_once_a_video_is_parsed(sandbox: Sandbox, video: Path) -> None:
    video_no = upload_video(sandbox, video, [("unique_id", "t"), ("tags", "mine")]).json()["data"]["videoNo"]
    [unparsed] = list_videos(sandbox, unique_id="t")["data"]["videos"]
    assert "tags" not in unparsed or unparsed["status"] != "UNPARSE"
    wait_until(lambda: sandbox.video_status(video_no) == "PARSE")
    [parsed] = list_videos(sandbox, unique_id="t")["data"]["videos"]
    assert parsed["tags"] == ["mine", "api"]
    assert [v["video_no"] for v in list_videos(sandbox, unique_id="t", tag="mine")["data"]["videos"]] == [video_no]
    assert list_videos(sandbox, unique_id="t", tag="other")["data"]["videos"] == []


def test_names_can_be_the_file_stem(video: Path) -> None:
    with Sandbox(api_key=API_KEY, rate_per_second=1000, video_names="stem") as stems:
        assert upload_video(stems, video).json()["data"]["videoName"] == "clip"
        [entry] = list_videos(stems)["data"]["videos"]
    assert entry["video_name"] == "clip"


def test_videos_move_to_parse_after_parse_seconds(sandbox: Sandbox, video: Path) -> None:
    video_no = upload_video(sandbox, video).json()["data"]["videoNo"]

    assert sandbox.video_status(video_no) == "UNPARSE"
    assert list_videos(sandbox, status="PARSE")["data"]["videos"] == []
    wait_until(lambda: sandbox.video_status(video_no) == "PARSE")
    assert [entry["video_no"] for entry in list_videos(sandbox, status="PARSE")["data"]["videos"]] == [video_no]


def test_fail_next_parse_marks_only_the_next_upload_failed(sandbox: Sandbox, video: Path) -> None:
    sandbox.fail_next_parse("unsupported codec")
    failing = upload_video(sandbox, video).json()["data"]["videoNo"]
    healthy = upload_video(sandbox, video).json()["data"]["videoNo"]

    wait_until(lambda: sandbox.video_status(failing) == "PARSE_ERROR" and sandbox.video_status(healthy) == "PARSE")
    [entry] = list_videos(sandbox, video_no=failing)["data"]["videos"]
    assert (entry["status"], entry["cause"]) == ("PARSE_ERROR", "unsupported codec")
    assert sandbox.video_status("VI000000000000000000") is None


def test_list_checks_the_key_the_rate_and_the_body(video: Path) -> None:
    with Sandbox(api_key=API_KEY, list_rate_per_second=2) as sandbox:
        assert list_videos(sandbox, api_key="wrong")["code"] == "0401"
        assert list_videos(sandbox)["code"] == "0000"
        assert list_videos(sandbox) == {
            "code": "0429",
            "msg": "Request has exceeded the limit.",
            "data": None,
        }
        time.sleep(1.05)
        not_json = requests.post(sandbox.url + LIST_PATH, data=b"{", headers={"Authorization": API_KEY})
        bad_page = list_videos(sandbox, page=0)

    assert not_json.json()["code"] == "0003"
    assert (bad_page["code"], bad_page["msg"]) == (
        "0003",
        "One or more parameters are incorrect: page and size must be positive integers",
    )


@pytest.fixture
def callback_receiver() -> Iterator[tuple[str, queue.Queue[dict[str, Any]]]]:
    notifications: queue.Queue[dict[str, Any]] = queue.Queue()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            notifications.put({"content_type": self.headers["Content-Type"], **json.loads(body)})
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Keep the test output quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", notifications
    server.shutdown()
    server.server_close()


def test_callback_is_posted_when_parsing_finishes(
    sandbox: Sandbox, video: Path, callback_receiver: tuple[str, queue.Queue[dict[str, Any]]]
) -> None:
    url, notifications = callback_receiver
    video_no = upload_video(sandbox, video, [("callback", url)]).json()["data"]["videoNo"]

    notification = notifications.get(timeout=3)

    assert notification == {"content_type": "application/json", "videoNo": video_no, "status": "PARSE"}


def test_unknown_paths_and_wrong_methods(sandbox: Sandbox) -> None:
    missing = requests.post(sandbox.url + "/serve/api/v1/nothing", headers={"Authorization": API_KEY})
    wrong_method = requests.get(sandbox.url + UPLOAD_PATH, headers={"Authorization": API_KEY})

    assert (missing.status_code, missing.json()["code"]) == (404, "S404")
    assert (wrong_method.status_code, wrong_method.headers["Allow"]) == (405, "POST")


def test_serve_logs_each_request_and_stops_on_sigterm(video: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome: list[str] = []

    def upload_then_terminate() -> None:
        try:
            wait_until(lambda: _accepts_connections(port), 20, "the sandbox to listen")
            with video.open("rb") as handle:
                encoder = MultipartEncoder(fields=[("file", (video.name, handle, "video/mp4"))])
                response = requests.post(
                    f"http://127.0.0.1:{port}{UPLOAD_PATH}",
                    data=encoder,
                    headers={"Content-Type": encoder.content_type, "Authorization": API_KEY},
                    timeout=5,
                )
            outcome.append(response.json()["code"])
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=upload_then_terminate, daemon=True).start()
    with structlog.testing.capture_logs() as logs:
        serve("127.0.0.1", port, API_KEY)

    assert outcome == ["0000"]
    [request_line] = [entry for entry in logs if entry["event"] == "sandbox_request"]
    assert request_line["filename"] == "clip.mp4"
    assert (request_line["status"], request_line["code"], request_line["size"]) == (200, "0000", 64 * 1024)


def _accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True
