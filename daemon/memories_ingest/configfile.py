"""The config file as a document: where it is, reading its YAML safely, and where it puts the ledger.

Kept apart from the validation in config, so that `status` and `list` find the ledger without loading pydantic.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/memories-ingest/config.yaml"
DEFAULT_LEDGER_PATH = "/var/lib/memories-ingest/ledger.db"


class ConfigError(Exception):
    """Every problem found in one config file, each as 'file: key.path: message'."""

    def __init__(self, path: str | os.PathLike[str], problems: Iterable[str]) -> None:
        self.path = str(path)
        self.problems = [f"{self.path}: {problem}" for problem in problems]
        super().__init__("\n".join(self.problems))


@functools.cache
def _loader() -> type:
    """A SafeLoader of our own, made on first use: `--help` needs this module's default path, not PyYAML."""
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML without aliases: a few lines of nested aliases (a "billion laughs") would expand to gigabytes."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in this config; write the value out", event.start_mark
                )
            return super().compose_node(parent, index)

    return Loader


def read(source: Path) -> Any:
    """The YAML document in a config file; ConfigError when it cannot be read or parsed."""
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, ["no such file; copy config.example.yaml there and edit it"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(source, [f"cannot be read: {error}"]) from None
    import yaml

    try:
        # A SafeLoader of our own: plain data, no aliases.
        return yaml.load(text, Loader=_loader())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(source, [f"{where}not valid YAML: {problem}"]) from None


def ledger_path(path: str | os.PathLike[str]) -> Path:
    """Only where the ledger is, from a config that may be wrong in every other way.

    status, list, retry and resume need nothing else, so a config the daemon rejected on reload leaves them working.
    """
    source = Path(path).absolute()
    document = read(source)
    ledger = document.get("ledger", DEFAULT_LEDGER_PATH) if isinstance(document, dict) else None
    if not isinstance(ledger, str) or not ledger.strip():
        raise ConfigError(source, [f"ledger: {ledger!r} is not a path"])
    return (source.parent / os.path.expanduser(ledger.strip())).resolve()
