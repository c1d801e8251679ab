"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memories_ingest.samples import write_video


@pytest.fixture
def make_video(tmp_path: Path) -> Callable[..., Path]:
    """A factory for real sample videos in tmp_path: ``make_video("clip.mkv", codec="vp9", audio=True)``.

    Keyword arguments are those of :func:`memories_ingest.samples.write_video`.
    """

    def make(name: str = "clip.mp4", **options: Any) -> Path:
        return write_video(tmp_path / name, **options)

    return make
