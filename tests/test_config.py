"""The config: every error at once with its key path, merging, the example file and the API key."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from memories_ingest.config import load, parse
from memories_ingest.configfile import ConfigError
from memories_ingest.keys import MissingApiKey, read_api_key
from memories_ingest.sandbox import Sandbox

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_the_example_config_is_valid_and_documents_every_key() -> None:
    config = load(ROOT / "config.example.yaml")
    assert [f.unique_id for f in config.folders] == ["front-door", "family-phones"]
    assert config.folders[0].tags == ("home", "doorbell", "outdoor")
    assert config.folders[0].latitude == "51.5007"
    assert config.folders[1].require_audio is True
    text = (ROOT / "config.example.yaml").read_text()
    for key in (
        "base_url",
        "api_key_env",
        "api_key_file",
        "ledger",
        "settle_seconds",
        "rescan_seconds",
        "polling",
        "rate_per_second",
        "workers",
        "tags",
        "camera_model",
        "latitude",
        "longitude",
        "retain_original_video",
        "video_transcription_prompt",
        "follow_symlinks",
        "hardlinks",
        "other_owners",
        "min_bytes_per_second",
        "max_indexing",
        "probe_timeout_seconds",
        "account_check_seconds",
        "connect_timeout_seconds",
        "read_timeout_seconds",
        "metadata",
        "after_upload",
        "move_to",
        "listen",
        "public_url",
        "poll_seconds",
        "callback",
        "require_audio",
        "unique_id",
        "recursive",
    ):
        assert f"{key}:" in text, key


def test_every_error_is_reported_at_once_with_file_and_key_path(tmp_path: Path) -> None:
    too_long = "x" * 201
    tags = ", ".join(f"t{i}" for i in range(21))
    path = write(
        tmp_path,
        f"""
api: {{base_url: ftp://example.com, colour: blue}}
watch: {{settle_seconds: -1}}
upload: {{workers: many}}
folders:
  - path: /a
    unique_id: ""
  - path: /b
    latitude: abc
    longitude: 200
    camera_model: {too_long}
    tags: [{tags}]
    recursive: maybe
""",
    )
    with pytest.raises(ConfigError) as caught:
        load(path)
    problems = caught.value.problems
    assert all(p.startswith(f"{path}: ") for p in problems)
    text = "\n".join(problems)
    assert "api.base_url: 'ftp://example.com' is not an http:// or https:// URL" in text
    assert "api.colour: unknown key" in text
    assert "watch.settle_seconds: -1 is too small" in text
    assert "upload.workers: 'many' is not a number" in text
    assert "folders[0].unique_id: must not be empty" in text
    assert "folders[1].latitude: 'abc' is not a decimal number" in text
    assert "folders[1].longitude: 200 is outside -180..180" in text
    assert "folders[1].camera_model: is 201 characters, at most 200 are allowed" in text
    assert "folders[1].tags: 21 tags, at most 19 are allowed (the daemon adds one of its own)" in text
    assert "folders[1].recursive: 'maybe' is not true or false" in text
    assert len(problems) == 10


def test_folder_tags_extend_the_defaults_and_other_keys_replace_them(tmp_path: Path) -> None:
    config = parse(
        {
            "defaults": {"tags": ["home", "cam"], "camera_model": "Default", "retain_original_video": False},
            "folders": [
                {"path": "a", "tags": ["cam", "door"], "camera_model": "Door"},
                {"path": "b"},
            ],
        },
        tmp_path / "c.yaml",
    )
    first, second = config.folders
    assert first.tags == ("home", "cam", "door")
    assert first.camera_model == "Door"
    assert second.camera_model == "Default"
    assert first.retain_original_video is False
    assert first.path == tmp_path / "a"
    assert config.upload_url == "https://api.memories.ai/serve/api/v1/upload"


def test_merged_tags_over_the_limit_and_overlapping_folders_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(
            {
                "defaults": {"tags": [f"d{i}" for i in range(14)]},
                "folders": [
                    {"path": "/x", "recursive": True, "tags": [f"f{i}" for i in range(6)]},
                    {"path": "/x/y"},
                    {"path": "/x"},
                ],
            },
            tmp_path / "c.yaml",
        )
    text = str(caught.value)
    assert "folders[0].tags: 20 tags with the defaults, at most 19 are allowed (the daemon adds one" in text
    assert "folders[1].path: /x/y is inside folders[0], which is recursive" in text
    assert "folders[2].path: /x is already folders[0]" in text


def test_settle_seconds_zero_is_valid_for_batch_runs(tmp_path: Path) -> None:
    config = parse({"watch": {"settle_seconds": 0}, "folders": [{"path": "v"}]}, tmp_path / "c.yaml")
    assert config.watch.settle_seconds == 0


def test_yaml_syntax_errors_and_missing_files_name_the_place(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line \d+, column \d+: not valid YAML"):
        load(write(tmp_path, "folders:\n  - path: [unclosed\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="folders: required key is missing"):
        load(write(tmp_path, "ledger: x.db\n"))


def test_check_command_exits_non_zero_with_every_error(tmp_path: Path) -> None:
    path = write(tmp_path, "folders:\n  - path: /a\n    latitude: north\n    bogus: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "memories_ingest.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert f"{path}: folders[0].latitude: 'north' is not a decimal number" in result.stderr
    assert f"{path}: folders[0].bogus: unknown key" in result.stderr
    example = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    example["ledger"] = str(tmp_path / "state" / "ledger.db")
    copy = write(tmp_path, yaml.safe_dump(example))
    ok = subprocess.run(
        [sys.executable, "-m", "memories_ingest.cli", "check", "-c", str(copy)],
        capture_output=True,
        text=True,
        env={**os.environ, "MEMORIES_API_KEY": "sk-example"},
    )
    assert ok.returncode == 0, ok.stderr


def test_api_key_from_environment_file_or_credentials(tmp_path: Path) -> None:
    config = parse({"folders": [{"path": "v"}]}, tmp_path / "c.yaml")
    assert read_api_key(config.api, {"MEMORIES_API_KEY": " k1 \n"}) == "k1"
    key_file = tmp_path / "key"
    key_file.write_text("k2\n")
    with_file = parse({"api": {"api_key_file": str(key_file)}, "folders": [{"path": "v"}]}, tmp_path / "c.yaml")
    assert read_api_key(with_file.api, {}) == "k2"
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "api-key").write_text("k3")
    assert read_api_key(config.api, {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}) == "k3"
    with pytest.raises(MissingApiKey, match="MEMORIES_API_KEY"):
        read_api_key(config.api, {})


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("sk-first\nsk-second\n", "holds more than one line"),
        ("Bearer sk-key\n", "a space, a control character or a character beyond ASCII"),
        ("sk-\x1b[2Jkey\n", "a space, a control character or a character beyond ASCII"),
        ("\n\n", "is empty"),
    ],
)
def test_a_key_that_cannot_be_one_is_refused_at_check_without_being_echoed(
    tmp_path: Path, content: str, why: str
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(content)
    config = write(
        tmp_path, f"api: {{api_key_file: {key_file}}}\nledger: {tmp_path}/ledger.db\nfolders: [{{path: v}}]\n"
    )
    env = {name: value for name, value in os.environ.items() if name != "MEMORIES_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "memories_ingest.cli", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 78
    assert why in result.stderr
    assert "sk-" not in result.stderr + result.stdout, "no part of the key is echoed"


def test_aliases_are_refused_so_a_billion_laughs_costs_nothing(tmp_path: Path) -> None:
    laughs = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        laughs += f"{level}: &{level} [" + ", ".join([f"*{previous}"] * 9) + "]\n"
    path = write(tmp_path, laughs + "folders: [{path: v}]\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert "aliases (*name) are not allowed in this config" in str(caught.value)
    assert "line 2" in str(caught.value)
    assert time.monotonic() - started < 30, "refused before anything expands"


@pytest.mark.parametrize(
    ("section", "value"),
    [
        ("upload.rate_per_second", ".inf"),
        ("watch.settle_seconds", ".nan"),
        ("watch.rescan_seconds", ".inf"),
        ("watch.poll_seconds", ".inf"),
    ],
)
def test_numbers_that_are_not_finite_are_refused(tmp_path: Path, section: str, value: str) -> None:
    group, name = section.split(".")
    path = write(tmp_path, f"{group}: {{{name}: {value}}}\nfolders: [{{path: v}}]\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert f"{section}: " in str(caught.value) and "is not a finite number" in str(caught.value)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_poll_interval_must_be_more_than_zero(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"watch: {{poll_seconds: {value}}}\nfolders: [{{path: v}}]\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert f"watch.poll_seconds: {value} is too small: it must be more than 0" in str(caught.value)


def test_the_poll_interval_defaults_to_two_seconds(tmp_path: Path) -> None:
    assert load(write(tmp_path, "folders: [{path: v}]\n")).watch.poll_seconds == 2.0


def check(config: Path, *args: str, key: str | None = "sk-example") -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name != "MEMORIES_API_KEY"}
    if key is not None:
        env["MEMORIES_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "memories_ingest.cli", "check", "-c", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_check_reports_field_and_cross_field_problems_in_one_run(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
ledger: {tmp_path}/ledger.db
folders:
  - path: /srv/cams
    recursive: true
    latitude: abc
  - path: /srv/cams/front
  - path: /srv/other
    after_upload: move
    move_to: /srv/cams/done
""",
    )
    result = check(path)
    assert result.returncode == 78
    assert "folders[0].latitude: 'abc' is not a decimal number" in result.stderr
    assert "folders[1].path: /srv/cams/front is inside folders[0], which is recursive" in result.stderr
    assert "folders[2].move_to: /srv/cams/done is inside folders[0]" in result.stderr


def test_check_finds_a_ledger_that_cannot_be_made_and_a_missing_key_together(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    path = write(tmp_path, f"ledger: {tmp_path}/a-file/ledger.db\nfolders: [{{path: v}}]\n")
    result = check(path, key=None)
    assert result.returncode == 78
    assert "the config has 2 problem(s)" in result.stderr
    assert f"ledger: {tmp_path / 'a-file'} is not a directory" in result.stderr
    assert "api: no API key: set the environment variable MEMORIES_API_KEY" in result.stderr


def test_check_online_says_whether_the_key_works_and_never_uploads(tmp_path: Path) -> None:
    with Sandbox(api_key="sk-right", rate_per_second=100) as sandbox:
        url = sandbox.url
        path = write(
            tmp_path,
            f"api: {{base_url: '{url}'}}\nledger: {tmp_path}/ledger.db\nfolders: [{{path: v, unique_id: garden}}]\n",
        )
        works = check(path, "--online", key="sk-right")
        refused = check(path, "--online", key="sk-wrong")
        queries = sandbox.list_queries()
        assert sandbox.requests() == [], "never an upload"
    assert works.returncode == 0 and "the key works (list_videos answered for scope garden)" in works.stdout
    assert refused.returncode == 77
    assert "the API key was refused" in refused.stderr and "sk-wrong" not in refused.stderr
    assert [query["unique_id"] for query in queries] == ["garden"]
    # The sandbox has stopped: nothing listens at its address any more.
    assert check(path, "--online", key="sk-right").returncode == 69


def test_a_key_pasted_where_its_variable_or_file_is_named_is_never_echoed(tmp_path: Path) -> None:
    for api in ("{api_key_env: sk-live-0123456789abcdef}", "{api_key_file: sk-live-0123456789abcdef}"):
        config = write(tmp_path, f"api: {api}\nledger: {tmp_path}/ledger.db\nfolders: [{{path: v}}]\n")
        result = check(config, key=None)
        assert result.returncode == 78
        assert "sk-live" not in result.stderr + result.stdout
        assert "api.api_key_env: is not the name of an environment variable" in result.stderr or (
            "cannot read the file that api.api_key_file names: No such file or directory" in result.stderr
        )


def test_a_relative_key_file_is_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "api-key").write_text("sk-from-beside-the-config\n")
    config = parse({"api": {"api_key_file": "api-key"}, "folders": [{"path": "v"}]}, tmp_path / "c.yaml")
    assert read_api_key(config.api, {}) == "sk-from-beside-the-config"
