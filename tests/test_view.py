"""What `status` tells: whether a daemon runs, how it watches, what settles, what was refused and what is a note."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

from memories_ingest.files import Version
from memories_ingest.ledger import Ledger
from memories_ingest.sandbox import Sandbox
from memories_ingest.view import printable, render, status

from conftest import API_KEY, COMMAND, daemon_config, run_cli, spawned, wait_until


def test_status_says_whether_a_daemon_runs_and_how_it_watches_each_folder(tmp_path: Path, sandbox: Sandbox) -> None:
    config = daemon_config(tmp_path, sandbox, watch={"settle_seconds": 3600})
    (tmp_path / "watched" / "thumbnail.jpg").write_bytes(b"not a video")
    (tmp_path / "watched" / "waiting.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(100))
    daemon = spawned(
        subprocess.Popen(
            [*COMMAND, "run", "-c", str(config)],
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "MEMORIES_API_KEY": API_KEY},
        )
    )
    wait_until(lambda: "last heartbeat" in run_cli(config, "status").stdout, 30, "the daemon's first heartbeat")
    text = run_cli(config, "status").stdout
    assert f"daemon running: pid {daemon.pid}, since " in text
    assert f"watching {tmp_path / 'watched'} (test-scope): inotify, it is on " in text
    assert "next rescan: " in text
    assert "settling: 1 file(s); next checked at" in text and "waiting.mp4" in text
    assert "ignored: 1 file(s) without a video extension" in text
    assert "pace: 20 uploads/s" in text
    document = json.loads(run_cli(config, "status", "--json").stdout)
    assert document["daemon"]["running"] is True and document["daemon"]["pid"] == daemon.pid
    assert document["folders"][0]["mode"] == "inotify"
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=30)
    after = run_cli(config, "status").stdout
    assert after.startswith("no daemon is running on this ledger (last seen ")
    assert "watching " not in after, "no daemon watches anything"


def test_rejections_are_listed_apart_from_notices(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    folder = tmp_path / "watched"
    for number, name in enumerate(("old.mp4", "later.mp4")):
        ledger.record_seen(folder / name, folder, "s", Version(10, 1, number, 1))
    old, later = (ledger.get(folder / name) for name in ("old.mp4", "later.mp4"))
    assert old is not None and later is not None
    ledger.mark_rejected(old.id, "video codec mpeg4 is not one of h264, hevc, vp9")
    assert ledger.mark_queued(later, "fp", {})
    claimed = ledger.claim([folder])
    assert claimed is not None
    ledger.release(claimed.id, "upload abandoned at shutdown")
    document = status(ledger)
    ledger.close()
    assert [e["error"] for e in document["problems"]] == ["video codec mpeg4 is not one of h264, hevc, vp9"]
    assert [e["error"] for e in document["notices"]] == ["upload abandoned at shutdown"]
    text = render(document)
    assert text.index("rejected or failed:") < text.index("video codec mpeg4") < text.index("notices:")
    assert text.index("notices:") < text.index("upload abandoned at shutdown")


def test_printable_escapes_controls_and_bytes_that_are_not_utf8() -> None:
    assert printable("a\x1b[2Jb\tc") == "a\\x1b[2Jb\\x09c"
    assert printable(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
    assert printable("right\u202eleft") == "right\\u202eleft"
    assert re.search("[\x00-\x1f\x7f-\x9f]", printable("".join(map(chr, range(0x100))))) is None
