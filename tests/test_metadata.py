"""Place, camera and capture time read from the file itself, and how they meet the folder's config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from memories_ingest.config import Folder, parse
from memories_ingest.files import Version
from memories_ingest.ledger import Ledger, Row
from memories_ingest.metadata import (
    camera_model_from_tags,
    camera_name,
    creation_time_from_tags,
    location_from_tags,
    parse_creation_time,
    parse_iso6709,
)
from memories_ingest.probe import MediaInfo, probe_path
from memories_ingest.samples import write_video
from memories_ingest.states import UPLOADED
from memories_ingest.uploader import upload_fields

from conftest import Pipeline

MakeVideo = Callable[..., Path]

IPHONE_TAGS = {
    "com.apple.quicktime.creationdate": "2024-05-06T09:08:09+0200",
    "com.apple.quicktime.location.ISO6709": "+51.5007-000.1246+012.000/",
    "com.apple.quicktime.make": "Apple",
    "com.apple.quicktime.model": "iPhone 15 Pro",
}
ANDROID_TAGS = {
    "creation_time": "2024-05-06T07:08:09.000000Z",
    "location": "+48.8584+002.2945/",
    "com.android.manufacturer": "Google",
    "com.android.model": "Pixel 8",
}
CAMERA_TAGS = {"location": "-33.8688+151.2093/", "make": "Acme", "model": "Cam 1"}
# Without use_metadata_tags the QuickTime muxers keep only the tags with a classic udta atom, as cameras do.
CLASSIC_ATOMS_ONLY = {"movflags": "-use_metadata_tags"}
RECORDED = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("+51.5007-000.1246+012.000/", ("51.5007", "-0.1246")),
        ("+51.5007-000.1246/", ("51.5007", "-0.1246")),
        ("+51.5007-0.1246", ("51.5007", "-0.1246")),
        (" +40.7128-074.0060/\n", ("40.7128", "-74.006")),
        ("-33.8688+151.2093+058.000/", ("-33.8688", "151.2093")),
        ("+35.6585805+139.7454329/", ("35.658581", "139.745433")),
        ("+51-000/", ("51", "0")),
        ("+51.-000.5/", ("51", "-0.5")),
        ("+90.0000+180.0000/", ("90", "180")),
        ("-90-180/", ("-90", "-180")),
        ("+51.5007-000.1246+012.000CRSWGS_84/", ("51.5007", "-0.1246")),
        ("+5130.042-00007.476/", ("51.5007", "-0.1246")),
        ("+513002.52-0000728.56/", ("51.5007", "-0.1246")),
    ],
)
def test_parses_iso_6709_points(text: str, expected: tuple[str, str]) -> None:
    assert parse_iso6709(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/",
        "abc",
        "51.5007,-0.1246",
        "+51.5007/",
        "+51.5007-000.1246+012.000+4/",
        "+51.5007-000.1246/extra",
        "+90.0001+000.0000/",
        "+51.5007-180.0001/",
        "+5160.00-00000.00/",
        "+513060-0000000/",
        "+5130.00-0000.00/",
        "+00.0000+000.0000/",
    ],
)
def test_ignores_malformed_and_out_of_range_points(text: str) -> None:
    assert parse_iso6709(text) is None


def test_location_prefers_the_apple_key_and_skips_malformed_values() -> None:
    apple = "com.apple.quicktime.location.iso6709"
    assert location_from_tags({"location": "+48.8584+002.2945/", apple: "+51.5007-000.1246/"}) == (
        "51.5007",
        "-0.1246",
    )
    assert location_from_tags({"location": "+48.8584+002.2945/", apple: "+99-000/"}) == ("48.8584", "2.2945")
    assert location_from_tags({"location-eng": "+48.8584+002.2945/"}) == ("48.8584", "2.2945")
    assert location_from_tags({"location": "somewhere"}) is None
    assert location_from_tags({}) is None


@pytest.mark.parametrize(
    ("make", "model", "expected"),
    [
        ("Apple", "iPhone 15 Pro", "Apple iPhone 15 Pro"),
        ("Canon", "Canon EOS R5", "Canon EOS R5"),
        ("GOPRO", "GoPro HERO12 Black", "GoPro HERO12 Black"),
        ("Go", "GoPro HERO12 Black", "Go GoPro HERO12 Black"),
        ("Google", None, "Google"),
        (None, "Pixel 8", "Pixel 8"),
        ("Acme\x00\x00", "  Cam \t 1 ", "Acme Cam 1"),
        (" ", "\x00", None),
        (None, None, None),
    ],
)
def test_camera_name_joins_make_and_model(make: str | None, model: str | None, expected: str | None) -> None:
    assert camera_name(make, model) == expected


def test_camera_name_fits_the_api_limit() -> None:
    name = camera_name("M" * 150, "X " * 100)
    assert name is not None and len(name) <= 200 and name == name.strip()


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"com.apple.quicktime.make": "Apple", "com.apple.quicktime.model": "iPhone 15 Pro"}, "Apple iPhone 15 Pro"),
        ({"com.android.manufacturer": "Google", "com.android.model": "Pixel 8"}, "Google Pixel 8"),
        ({"make": "Acme", "model": "Cam 1"}, "Acme Cam 1"),
        ({"make-eng": "Acme", "model-eng": "Cam 1"}, "Acme Cam 1"),
        ({"manufacturer": "DJI", "model": "Osmo Action 4"}, "DJI Osmo Action 4"),
        ({"com.apple.quicktime.make": "Apple", "make": "Acme", "model": "Cam 1"}, "Apple Cam 1"),
        ({"make": "", "manufacturer": "Acme", "model": "Cam 1"}, "Acme Cam 1"),
        ({"firmware": "HD9.01.01.60.00"}, None),
        ({}, None),
    ],
)
def test_camera_model_from_tags(tags: dict[str, str], expected: str | None) -> None:
    assert camera_model_from_tags(tags) == expected


def test_creation_time_with_a_phones_offset() -> None:
    assert parse_creation_time("2024-05-06T09:08:09+0200") == RECORDED
    assert parse_creation_time("2024-05-06T02:08:09.5-0500") == RECORDED.replace(microsecond=500_000)


def test_creation_time_prefers_apples_date_then_the_container_then_the_streams() -> None:
    apple = {"com.apple.quicktime.creationdate": "2024-05-06T09:08:09+0200", "creation_time": "2025-01-01T00:00:00Z"}
    assert creation_time_from_tags(apple) == RECORDED
    assert creation_time_from_tags({"creation_time": "2024-05-06T07:08:09Z"}) == RECORDED
    unreadable = {"com.apple.quicktime.creationdate": "soon", "creation_time": "2024-05-06T07:08:09Z"}
    assert creation_time_from_tags(unreadable) == RECORDED
    streams = [{"language": "und"}, {"creation_time": "2024-05-06T07:08:09.000000Z"}]
    assert creation_time_from_tags({"creation_time": "never"}, streams) == RECORDED
    assert creation_time_from_tags({}, [{}]) is None


@pytest.mark.parametrize(
    ("name", "tags", "muxer_options", "expected"),
    [
        ("phone.mov", IPHONE_TAGS, None, (RECORDED, "51.5007", "-0.1246", "Apple iPhone 15 Pro")),
        ("phone.mp4", IPHONE_TAGS, None, (RECORDED, "51.5007", "-0.1246", "Apple iPhone 15 Pro")),
        ("android.mp4", ANDROID_TAGS, None, (RECORDED, "48.8584", "2.2945", "Google Pixel 8")),
        ("camera.mov", CAMERA_TAGS, CLASSIC_ATOMS_ONLY, (None, "-33.8688", "151.2093", "Acme Cam 1")),
        ("camera.mp4", CAMERA_TAGS, CLASSIC_ATOMS_ONLY, (None, "-33.8688", "151.2093", None)),
        ("camera.mkv", CAMERA_TAGS, None, (None, "-33.8688", "151.2093", "Acme Cam 1")),
        ("plain.mp4", {}, None, (None, None, None, None)),
        ("lost.mp4", {"location": "+00.0000+000.0000/", "model": " "}, None, (None, None, None, None)),
    ],
)
def test_probe_reads_place_camera_and_time_from_real_files(
    make_video: MakeVideo,
    name: str,
    tags: dict[str, str],
    muxer_options: dict[str, str] | None,
    expected: tuple[datetime | None, str | None, str | None, str | None],
) -> None:
    info = probe_path(make_video(name, metadata=tags, muxer_options=muxer_options))

    assert (info.creation_time, info.latitude, info.longitude, info.camera_model) == expected


def test_media_info_round_trips_and_reads_rows_stored_before_these_fields(make_video: MakeVideo) -> None:
    info = probe_path(make_video("phone.mov", metadata=IPHONE_TAGS))
    stored = json.loads(json.dumps(info.to_json()))
    assert MediaInfo.from_json(stored) == info

    older = {key: value for key, value in stored.items() if key not in ("latitude", "longitude", "camera_model")}
    assert MediaInfo.from_json(older) == info

    cleared = {**stored, "latitude": None, "longitude": None, "camera_model": None}
    restored = MediaInfo.from_json(cleared)
    assert (restored.latitude, restored.longitude, restored.camera_model) == (None, None, None)


def test_probe_command_shows_what_it_found(make_video: MakeVideo) -> None:
    video = make_video("phone.mov", metadata=IPHONE_TAGS)
    result = subprocess.run(
        [sys.executable, "-m", "memories_ingest.cli", "probe", str(video)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["creation_time"] == "2024-05-06T07:08:09+00:00"
    assert (report["latitude"], report["longitude"]) == ("51.5007", "-0.1246")
    assert report["camera_model"] == "Apple iPhone 15 Pro"


def folder_with(tmp_path: Path, **keys: Any) -> Folder:
    return parse({"folders": [{"path": str(tmp_path / "videos"), **keys}]}, tmp_path / "c.yaml").folders[0]


def queued_row(tmp_path: Path, media: MediaInfo) -> Row:
    ledger = Ledger(tmp_path / "l.db")
    path = tmp_path / "videos" / "clip.mov"
    ledger.record_seen(path, tmp_path / "videos", None, Version(1000, 1_700_000_000 * 10**9, 42, 1))
    seen = ledger.get(path)
    assert seen is not None
    assert ledger.mark_queued(seen, "fp", media.to_json())
    row = ledger.get(path)
    assert row is not None
    return row


def media(**fields: Any) -> MediaInfo:
    described: dict[str, Any] = {"creation_time": RECORDED, **fields}
    return MediaInfo("mov,mp4,m4a,3gp,3g2,mj2", "h264", None, 64, 64, 1.0, **described)


FROM_FILE = media(latitude="51.5007", longitude="-0.1246", camera_model="Apple iPhone 15 Pro")
NOTHING_IN_FILE = media()
CONFIGURED = {"camera_model": "Door Cam", "latitude": 40.7128, "longitude": -74.006}


@pytest.mark.parametrize(
    ("order", "config", "file", "expected"),
    [
        ("config_first", CONFIGURED, FROM_FILE, ("Door Cam", "40.7128", "-74.006")),
        ("config_first", {}, FROM_FILE, ("Apple iPhone 15 Pro", "51.5007", "-0.1246")),
        ("config_first", {"camera_model": "Door Cam"}, FROM_FILE, ("Door Cam", "51.5007", "-0.1246")),
        ("config_first", CONFIGURED, NOTHING_IN_FILE, ("Door Cam", "40.7128", "-74.006")),
        ("config_first", {}, NOTHING_IN_FILE, (None, None, None)),
        ("file_first", CONFIGURED, FROM_FILE, ("Apple iPhone 15 Pro", "51.5007", "-0.1246")),
        ("file_first", CONFIGURED, NOTHING_IN_FILE, ("Door Cam", "40.7128", "-74.006")),
        ("file_first", CONFIGURED, media(camera_model="Pixel 8"), ("Pixel 8", "40.7128", "-74.006")),
        ("file_first", {}, FROM_FILE, ("Apple iPhone 15 Pro", "51.5007", "-0.1246")),
        ("file_first", {}, NOTHING_IN_FILE, (None, None, None)),
    ],
)
def test_upload_fields_follow_the_folders_metadata_order(
    tmp_path: Path,
    order: str,
    config: dict[str, Any],
    file: MediaInfo,
    expected: tuple[str | None, str | None, str | None],
) -> None:
    folder = folder_with(tmp_path, metadata=order, **config)

    fields = dict(upload_fields(folder, queued_row(tmp_path, file)))

    assert (fields.get("camera_model"), fields.get("latitude"), fields.get("longitude")) == expected
    assert fields["datetime_taken"] == RECORDED.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def test_upload_fields_fall_back_to_the_mtime_without_a_creation_time(tmp_path: Path) -> None:
    row = queued_row(tmp_path, media(creation_time=None))

    fields = dict(upload_fields(folder_with(tmp_path), row))

    assert fields["datetime_taken"] == datetime.fromtimestamp(1_700_000_000).strftime("%Y-%m-%d %H:%M:%S")


def test_upload_fields_read_rows_stored_before_these_fields(tmp_path: Path) -> None:
    new_keys = ("latitude", "longitude", "camera_model")
    stored = {key: value for key, value in media(tags=dict(CAMERA_TAGS)).to_json().items() if key not in new_keys}
    ledger = Ledger(tmp_path / "l.db")
    path = tmp_path / "videos" / "old.mov"
    ledger.record_seen(path, tmp_path / "videos", None, Version(1000, 1, 42, 1))
    seen = ledger.get(path)
    assert seen is not None and ledger.mark_queued(seen, "fp", stored)
    row = ledger.get(path)
    assert row is not None

    fields = dict(upload_fields(folder_with(tmp_path), row))

    assert (fields["camera_model"], fields["latitude"], fields["longitude"]) == ("Acme Cam 1", "-33.8688", "151.2093")


def test_uploads_carry_the_files_place_camera_and_time(pipeline: Callable[..., Pipeline], tmp_path: Path) -> None:
    phones, fleet = tmp_path / "phones", tmp_path / "fleet"
    phones.mkdir()
    fleet.mkdir()
    run = pipeline(
        folders=[
            {"path": str(phones), "unique_id": "phones"},
            {"path": str(fleet), "unique_id": "fleet", "metadata": "file_first", **CONFIGURED},
        ]
    ).start()
    for folder in (phones, fleet):
        staged = write_video(tmp_path / f"{folder.name}.mov", metadata=IPHONE_TAGS)
        shutil.move(staged, folder / "clip.mov")
    for folder in (phones, fleet):
        run.wait_state(folder / "clip.mov", UPLOADED)

    received = run.sandbox.received()
    assert sorted(video.unique_id or "" for video in received) == ["fleet", "phones"]
    for video in received:
        assert video.fields["camera_model"] == ["Apple iPhone 15 Pro"]
        assert (video.fields["latitude"], video.fields["longitude"]) == (["51.5007"], ["-0.1246"])
        assert video.fields["datetime_taken"] == [RECORDED.astimezone().strftime("%Y-%m-%d %H:%M:%S")]


def test_a_config_first_folder_keeps_its_own_values(pipeline: Callable[..., Pipeline], tmp_path: Path) -> None:
    watched = tmp_path / "watched"
    run = pipeline(folders=[{"path": str(watched), "unique_id": "door", **CONFIGURED}]).start()
    staged = write_video(tmp_path / "staged.mov", metadata=IPHONE_TAGS)
    os.replace(staged, watched / "clip.mov")
    run.wait_state(watched / "clip.mov", UPLOADED)

    (received,) = run.sandbox.received()
    assert received.fields["camera_model"] == ["Door Cam"]
    assert (received.fields["latitude"], received.fields["longitude"]) == (["40.7128"], ["-74.006"])
