"""The YAML config: checked once at start-up, every error reported together with its key path."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from .api import MAX_CALLBACK, MAX_CAMERA_MODEL, MAX_TAGS
from .configfile import DEFAULT_LEDGER_PATH, ConfigError, read

# The daemon adds one tag of its own to every upload, the file's identity: the rest are the config's.
MAX_CONFIG_TAGS = MAX_TAGS - 1

DEFAULT_BASE_URL = "https://api.memories.ai"


def _decimal_text(value: Any, low: int, high: int) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{value!r} is not a decimal number")
    text = str(value).strip()
    if not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)", text):
        raise ValueError(f"{value!r} is not a decimal number")
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal number") from None
    if not low <= number <= high:
        raise ValueError(f"{text} is outside {low}..{high}")
    return text


def _latitude(value: Any) -> str | None:
    return _decimal_text(value, -90, 90)


def _longitude(value: Any) -> str | None:
    return _decimal_text(value, -180, 180)


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        raise ValueError("must be a list of tags, e.g. [garden, front-door]")
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list of tags")
    tags = []
    for tag in value:
        if isinstance(tag, bool) or not isinstance(tag, (str, int, float)) or not str(tag).strip():
            raise ValueError(f"{tag!r} is not a tag: tags are non-empty words")
        tags.append(str(tag).strip())
    if len(tags) > MAX_CONFIG_TAGS:
        raise ValueError(f"{len(tags)} tags, at most {MAX_CONFIG_TAGS} are allowed (the daemon adds one of its own)")
    return tags


def _polling(value: Any) -> bool | str:
    if value is True or value is False or value == "auto":
        return bool(value) if value != "auto" else "auto"
    raise ValueError(f"{value!r} is not true, false or auto")


Latitude = Annotated[str | None, BeforeValidator(_latitude)]
Longitude = Annotated[str | None, BeforeValidator(_longitude)]
Tags = Annotated[list[str], BeforeValidator(_tags)]


class _Strict(BaseModel):
    # A number of .inf or .nan passes every bound, then makes a worker spin: only finite numbers are taken.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, allow_inf_nan=False)


class ApiSection(_Strict):
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "MEMORIES_API_KEY"
    api_key_file: str | None = None
    connect_timeout_seconds: float = Field(10.0, gt=0)
    read_timeout_seconds: float = Field(120.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, value: str) -> str:
        # Never echoed: a key pasted here by mistake must not reach the terminal or the journal.
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("is not the name of an environment variable: it names the variable that holds the key")
        return value


class WatchSection(_Strict):
    settle_seconds: float = Field(5.0, ge=0)
    rescan_seconds: float = Field(300.0, gt=0)
    poll_seconds: float = Field(2.0, gt=0)
    polling: Annotated[bool | Literal["auto"], BeforeValidator(_polling)] = "auto"
    follow_symlinks: bool = False
    hardlinks: Literal["upload", "reject"] = "upload"
    other_owners: Literal["upload", "reject"] = "upload"


class UploadSection(_Strict):
    rate_per_second: float = Field(1.0, gt=0)
    workers: int = Field(1, ge=1, le=16)
    probe_timeout_seconds: float = Field(30.0, gt=0)
    account_check_seconds: float = Field(600.0, gt=0)
    min_bytes_per_second: int = Field(32 * 1024, ge=1024)
    max_indexing: int | None = Field(None, ge=1)
    # A first SIGTERM lets an upload in flight finish for this long, then abandons it cleanly.
    shutdown_grace_seconds: float = Field(20.0, ge=0)


class FolderFields(_Strict):
    """Keys that `defaults:` and each folder both take."""

    tags: Tags = []
    camera_model: str | None = Field(None, max_length=MAX_CAMERA_MODEL)
    latitude: Latitude = None
    longitude: Longitude = None
    retain_original_video: bool | None = None
    video_transcription_prompt: str | None = None
    callback: str | None = Field(None, max_length=MAX_CALLBACK)
    require_audio: bool | None = None
    metadata: Literal["config_first", "file_first"] | None = None
    after_upload: Literal["keep", "delete", "move"] | None = None
    move_to: str | None = None


class FolderSection(FolderFields):
    path: str
    unique_id: str | None = None
    recursive: bool = False

    @field_validator("unique_id")
    @classmethod
    def _non_empty(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("must not be empty: leave the key out to upload without a scope")
        return value


def _address(value: Any) -> str | None:
    if value is None:
        return None
    match = re.fullmatch(r"(?P<host>[^\s:]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})", str(value))
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"{value!r} is not host:port, e.g. 127.0.0.1:9750")
    return str(value)


Address = Annotated[str | None, BeforeValidator(_address)]


# The daemon appends "/" and a secret token of this many characters to indexing.public_url.
CALLBACK_TOKEN_CHARS = 32


class IndexingSection(_Strict):
    listen: Address = None
    public_url: str | None = Field(None, max_length=MAX_CALLBACK - 1 - CALLBACK_TOKEN_CHARS)
    poll_seconds: float | None = Field(None, gt=0)

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value


class MonitorSection(_Strict):
    listen: Address = None


class ConfigFile(_Strict):
    api: ApiSection = ApiSection()
    ledger: str = DEFAULT_LEDGER_PATH
    watch: WatchSection = WatchSection()
    upload: UploadSection = UploadSection()
    defaults: FolderFields = FolderFields()
    folders: list[FolderSection] = Field(min_length=1)
    indexing: IndexingSection = IndexingSection()
    monitor: MonitorSection = MonitorSection()


@dataclass(frozen=True)
class Folder:
    """A watched folder with `defaults:` merged in: what every upload from it carries."""

    path: Path
    unique_id: str | None
    recursive: bool
    tags: tuple[str, ...]
    camera_model: str | None
    latitude: str | None
    longitude: str | None
    retain_original_video: bool | None
    video_transcription_prompt: str | None
    callback: str | None
    require_audio: bool
    metadata: Literal["config_first", "file_first"]
    after_upload: Literal["keep", "delete", "move"]
    move_to: Path | None

    @property
    def action(self) -> str | None:
        """What happens to a file of this folder once it has a videoNo: delete, move, or None to keep it."""
        return None if self.after_upload == "keep" else self.after_upload

    def contains(self, path: Path) -> bool:
        try:
            relative = path.relative_to(self.path)
        except ValueError:
            return False
        return self.recursive or len(relative.parts) == 1


@dataclass(frozen=True)
class Config:
    source: Path
    api: ApiSection
    ledger: Path
    watch: WatchSection
    upload: UploadSection
    folders: tuple[Folder, ...]
    indexing: IndexingSection
    monitor: MonitorSection
    defaults: Folder

    def folder_for(self, path: Path) -> Folder | None:
        for folder in self.folders:
            if folder.contains(path):
                return folder
        return None

    @property
    def upload_url(self) -> str:
        return f"{self.api.base_url}/serve/api/v1/upload"

    @property
    def list_url(self) -> str:
        return f"{self.api.base_url}/serve/api/v1/list_videos"


def _key_path(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.startswith("function-") or part in ("str", "int", "float", "bool"):
            continue
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    if kind in ("bool_type", "bool_parsing"):
        return f"{error['input']!r} is not true or false"
    if kind == "literal_error":
        return f"{error['input']!r} is not one of {error.get('ctx', {}).get('expected', '')}"
    if kind in ("string_too_long",):
        limit = error.get("ctx", {}).get("max_length")
        return f"is {len(error['input'])} characters, at most {limit} are allowed"
    bounds = {"greater_than_equal": "at least", "greater_than": "more than", "less_than_equal": "at most"}
    if kind in bounds:
        limit = next(iter(error.get("ctx", {}).values()), "")
        size = "large" if kind.startswith("less") else "small"
        return f"{error['input']!r} is too {size}: it must be {bounds[kind]} {limit}"
    if kind == "finite_number":
        return f"{error['input']!r} is not a finite number"
    if kind in ("float_parsing", "float_type", "int_parsing", "int_type"):
        return f"{error['input']!r} is not a number"
    return message


def _merge(defaults: FolderFields, folder: FolderSection, base: Path) -> Folder:
    def pick(key: str) -> Any:
        return getattr(folder, key) if key in folder.model_fields_set else getattr(defaults, key)

    tags = tuple(dict.fromkeys([*defaults.tags, *folder.tags]))
    return Folder(
        path=(base / os.path.expanduser(folder.path)).resolve(),
        unique_id=folder.unique_id,
        recursive=folder.recursive,
        tags=tags,
        camera_model=pick("camera_model"),
        latitude=pick("latitude"),
        longitude=pick("longitude"),
        retain_original_video=pick("retain_original_video"),
        video_transcription_prompt=pick("video_transcription_prompt"),
        callback=pick("callback"),
        require_audio=bool(pick("require_audio")),
        metadata=pick("metadata") or "config_first",
        after_upload=pick("after_upload") or "keep",
        move_to=(base / os.path.expanduser(pick("move_to"))).resolve() if pick("move_to") else None,
    )


def _folder_problems(numbered: list[tuple[int, Folder]]) -> list[str]:
    """Problems between folders; each folder is numbered as in the file, whether or not the others validated."""
    problems = []
    for position, (index, folder) in enumerate(numbered):
        if folder.after_upload == "move" and folder.move_to is None:
            problems.append(f"folders[{index}].move_to: required when after_upload is move")
        if folder.move_to is not None:
            for other_index, other in numbered:
                if folder.move_to == other.path or (
                    folder.move_to.is_relative_to(other.path)
                    and (other.recursive or folder.move_to.parent == other.path)
                ):
                    problems.append(
                        f"folders[{index}].move_to: {folder.move_to} is inside folders[{other_index}], "
                        "so moved files would be seen as new ones"
                    )
        if len(folder.tags) > MAX_CONFIG_TAGS:
            problems.append(
                f"folders[{index}].tags: {len(folder.tags)} tags with the defaults, at most {MAX_CONFIG_TAGS} are "
                "allowed (the daemon adds one of its own)"
            )
        for earlier_index, earlier in numbered[:position]:
            if folder.path == earlier.path:
                problems.append(f"folders[{index}].path: {folder.path} is already folders[{earlier_index}]")
            elif folder.path.is_relative_to(earlier.path) and earlier.recursive:
                problems.append(
                    f"folders[{index}].path: {folder.path} is inside folders[{earlier_index}], "
                    "which is recursive; a file must belong to one folder"
                )
            elif earlier.path.is_relative_to(folder.path) and folder.recursive:
                problems.append(
                    f"folders[{index}].path: {folder.path} contains folders[{earlier_index}] and is recursive; "
                    "a file must belong to one folder"
                )
    return problems


def _indexing_problems(indexing: IndexingSection) -> list[str]:
    if indexing.listen and not indexing.public_url:
        return ["indexing.public_url: required with indexing.listen: the address memories.ai can reach the listener at"]
    if indexing.public_url and not indexing.listen:
        return ["indexing.listen: required with indexing.public_url: where the daemon listens for the callbacks"]
    return []


def _valid_folders(document: dict[str, Any], base: Path) -> list[tuple[int, Folder]]:
    """The folders of a config that failed validation which are valid by themselves, numbered as in the file."""
    try:
        defaults = FolderFields.model_validate(document.get("defaults") or {})
    except ValidationError:
        defaults = FolderFields()
    raw = document.get("folders")
    valid = []
    for index, folder in enumerate(raw if isinstance(raw, list) else []):
        try:
            valid.append((index, _merge(defaults, FolderSection.model_validate(folder), base)))
        except ValidationError as error:
            # A folder with a bad latitude still has a place: judge it without the keys that are wrong.
            wrong = {e["loc"][0] for e in error.errors() if e["loc"]}
            if not isinstance(folder, dict) or "path" in wrong:
                continue
            try:
                kept = {key: value for key, value in folder.items() if key not in wrong}
                valid.append((index, _merge(defaults, FolderSection.model_validate(kept), base)))
            except ValidationError:
                continue
    return valid


def parse(document: Any, source: Path) -> Config:
    """Validate a loaded YAML document; raise ConfigError with every problem found."""
    if document is None:
        raise ConfigError(source, ["the file is empty; see config.example.yaml"])
    if not isinstance(document, dict):
        raise ConfigError(source, ["the top level must be a mapping of keys such as api, folders"])
    base = source.parent
    try:
        checked = ConfigFile.model_validate(document)
    except ValidationError as error:
        problems = [f"{_key_path(e['loc'])}: {_message(e)}" for e in error.errors(include_url=False)]
        # Every problem at once: those between folders too, among the folders that are valid on their own.
        raise ConfigError(source, problems + _folder_problems(_valid_folders(document, base))) from None
    folders = tuple(_merge(checked.defaults, folder, base) for folder in checked.folders)
    problems = _folder_problems(list(enumerate(folders))) + _indexing_problems(checked.indexing)
    if problems:
        raise ConfigError(source, problems)
    api = checked.api
    if api.api_key_file:
        api = api.model_copy(update={"api_key_file": str((base / os.path.expanduser(api.api_key_file)).resolve())})
    return Config(
        source=source,
        api=api,
        ledger=(base / os.path.expanduser(checked.ledger)).resolve(),
        watch=checked.watch,
        upload=checked.upload,
        folders=folders,
        indexing=checked.indexing,
        monitor=checked.monitor,
        defaults=_merge(checked.defaults, FolderSection(path=str(base)), base),
    )


def load(path: str | os.PathLike[str]) -> Config:
    source = Path(path).absolute()
    return parse(read(source), source)
