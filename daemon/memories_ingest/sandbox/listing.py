"""How list_videos shows a stored video, and which videos a query selects."""

from __future__ import annotations

from typing import Any

from .. import api
from .records import StoredVideo

# The server appends this tag to every upload.
API_TAG = "api"


def matches(entry: dict[str, Any], query: dict[str, Any]) -> bool:
    """Whether a listed video passes the query's filters; without a unique_id, the scope is `default`."""
    if entry["unique_id"] != (query.get("unique_id") or api.DEFAULT_SCOPE):
        return False
    for name in ("video_no", "status"):
        if query.get(name) not in (None, "") and entry[name] != query[name]:
            return False
    if query.get("video_nos") is not None and entry["video_no"] not in query["video_nos"]:
        return False
    return query.get("tag") in (None, "") or query["tag"] in entry.get("tags", ())


def list_entry(stored: StoredVideo) -> dict[str, Any]:
    video = stored.video
    entry: dict[str, Any] = {
        "video_no": video.video_no,
        "video_name": video.video_name,
        "status": stored.status,
        "cause": stored.cause or "null",
        "size": str(video.size),
        "duration": "0",
        "create_time": str(int(video.received_at * 1000)),
        "unique_id": video.scope,
    }
    # Tags are listed once a video is parsed, not before.
    if stored.status != api.NOT_PARSED:
        entry["tags"] = [*video.tags, API_TAG]
    return entry
