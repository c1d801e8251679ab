"""The API key: where it is read from, and how it is kept out of every log line, exception and ledger row."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ApiSection

# Every key this process has read: the last line of defence scrubs them from any text bound for a log or the ledger.
_SECRETS: set[str] = set()
REDACTED = "[the API key]"


def keep_secret(key: str) -> None:
    """From now on, scrub this key from every text bound for a log or the ledger."""
    if len(key) >= 4:
        _SECRETS.add(key)


def redact(text: str) -> str:
    """The text without any API key this process has read in it."""
    for secret in _SECRETS:
        text = text.replace(secret, REDACTED)
    return text


def redact_values(value: Any) -> Any:
    """A log event's value without any key in it, however deeply nested: strings, lists, tuples and dicts."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return [redact_values(item) for item in value]
    if isinstance(value, dict):
        return {name: redact_values(item) for name, item in value.items()}
    return value


class MissingApiKey(Exception):
    """No usable key: none found, or one that cannot be a key. The message never holds the key."""


def _usable(key: str, where: str) -> str:
    """The key, stripped of surrounding whitespace; refused, without being echoed, when it cannot be one."""
    key = key.strip()
    if not key:
        raise MissingApiKey(f"{where} is empty")
    if "\n" in key or "\r" in key:
        raise MissingApiKey(f"{where} holds more than one line; it must hold the key alone, on one line")
    if not all(0x21 <= ord(character) <= 0x7E for character in key):
        raise MissingApiKey(
            f"{where} holds a space, a control character or a character beyond ASCII, which no API key has "
            "(the key goes into the Authorization header raw, with no 'Bearer ')"
        )
    keep_secret(key)
    return key


def read_api_key(api: ApiSection, environ: Mapping[str, str] | None = None) -> str:
    """The key, from the environment variable, api.api_key_file, or a systemd credential."""
    env = os.environ if environ is None else environ
    if env.get(api.api_key_env, "").strip():
        return _usable(env[api.api_key_env], f"the environment variable {api.api_key_env}")
    candidates = []
    if api.api_key_file:
        candidates.append((Path(os.path.expanduser(api.api_key_file)), "the file that api.api_key_file names"))
    if env.get("CREDENTIALS_DIRECTORY"):
        candidates.append((Path(env["CREDENTIALS_DIRECTORY"]) / "api-key", "the systemd credential api-key"))
    for candidate, where in candidates:
        # The path is not echoed: a key pasted into api.api_key_file by mistake must not reach the journal.
        try:
            text = candidate.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MissingApiKey(f"{where} is not text") from None
        except OSError as error:
            raise MissingApiKey(f"cannot read {where}: {error.strerror}") from None
        return _usable(text, where)
    raise MissingApiKey(f"no API key: set the environment variable {api.api_key_env} or api.api_key_file in the config")


def key_fingerprint(key: str) -> str:
    """A short one-way name for a key: enough to tell two keys apart, nothing that reveals either."""
    return hashlib.sha256(b"memories-ingest key\0" + key.encode()).hexdigest()[:12]
