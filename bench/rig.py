"""What every section measures with: the daemon's config and environment, its ledger, the videos, the tree, the sink."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memories_ingest import samples
from memories_ingest.files import Version
from memories_ingest.ledger import Ledger

from .measure import Proc
from .report import MIB, Report, mib, say, seconds

BENCH_DIR = Path(__file__).resolve().parent
KEY = "bench-key"
UPLOAD_PATH = "/serve/api/v1/upload"
PYTHONPATH: list[str] = []


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["MEMORIES_API_KEY"] = KEY
    if PYTHONPATH:
        env["PYTHONPATH"] = os.pathsep.join([*PYTHONPATH, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def daemon_argv(config: Path, *, once: bool) -> list[str]:
    script = Path(sys.executable).with_name("memories-ingest")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "memories_ingest.cli"]
    return [*base, "run", *(["--once"] if once else []), "-c", str(config)]


def write_config(
    path: Path,
    *,
    base_url: str,
    folder: Path,
    ledger: Path,
    settle: float = 0.0,
    polling: bool = False,
    rescan: float = 300.0,
    rate_per_second: float = 1.0,
    recursive: bool = False,
) -> Path:
    document = {
        "api": {"base_url": base_url},
        "ledger": str(ledger),
        "watch": {"settle_seconds": settle, "rescan_seconds": rescan, "polling": polling},
        "upload": {"rate_per_second": rate_per_second},
        "folders": [{"path": str(folder), "unique_id": "bench", "recursive": recursive}],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")  # JSON is YAML
    return path


def tree_run(base: Path, tree: Path, template: Path, *, polling: bool = False, rescan: float = 300.0) -> Path:
    """A fresh copy of the 100k-file tree's ledger in base, and a config over the tree; its API is unreachable."""
    base.mkdir()
    ledger = base / "ledger.db"
    shutil.copyfile(template, ledger)
    return write_config(
        base / "config.yaml",
        base_url="http://127.0.0.1:9",
        folder=tree,
        ledger=ledger,
        recursive=True,
        polling=polling,
        rescan=rescan,
    )


def counts(ledger_path: Path) -> dict[str, int]:
    ledger = Ledger(ledger_path)
    try:
        return {state: n for state, n in ledger.counts().items() if n}
    finally:
        ledger.close()


def check_untouched(ledger_path: Path, proc: Proc, total: int, what: str) -> int:
    """How many files the daemon settled, probed or hashed again: rows not `uploaded`, or scan changes."""
    state = counts(ledger_path)
    changed = sum(int(event.get("new_or_changed", 0)) for _, event in proc.named("scanned"))
    touched = total - state.get("uploaded", 0) + changed + proc.count("queued") + proc.count("rejected")
    if touched:
        say(f"  {what}: {touched} files touched again! ledger {state}, scan changes {changed}")
    return touched


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_video(path: Path, size: int, *, sparse: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    samples.write_video(path, seconds=2, faststart=True)
    if size > path.stat().st_size:
        samples.faststart_padding(path, size, sparse=sparse)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def padded_copies(sample: bytes, count: int, offset: int = 0) -> Iterator[bytes]:
    """The sample with a free box of a different size each time: same video, different fingerprint."""
    for index in range(count):
        padding = 8 + offset + index
        yield sample + struct.pack(">I4s", padding, b"free") + bytes(padding - 8)


@dataclass
class Context:
    work: Path
    quick: bool
    rounds: int
    report: Report
    sparse: bool = False
    _videos: dict[int, Path] = field(default_factory=dict)
    _tree: tuple[Path, Path] | None = None

    def video(self, size: int) -> Path:
        """A valid faststart MP4 of exactly size bytes, alone in its own folder; made once per run."""
        if size not in self._videos:
            label = f"{size // MIB}m"
            started = time.monotonic()
            self._videos[size] = make_video(self.work / "videos" / label / "clip.mp4", size, sparse=self.sparse)
            say(f"  made a {mib(size)} video in {seconds(time.monotonic() - started)}")
        return self._videos[size]

    def tree(self) -> tuple[Path, Path]:
        """100,000 tiny files in 100 directories, and a ledger where every one is already uploaded."""
        if self._tree is None:
            self._tree = build_tree(self.work / "tree", self.work / "tree-ledger.db")
        return self._tree


def build_tree(root: Path, ledger_path: Path, dirs: int = 100, per_dir: int = 1000) -> tuple[Path, Path]:
    started = time.monotonic()
    root = root.resolve()
    payload = b"not a video"
    for d in range(dirs):
        directory = root / f"d{d:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        for f in range(per_dir):
            fd = os.open(directory / f"f{f:04d}.mp4", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, payload)
            os.close(fd)
    made = time.monotonic()
    ledger = Ledger(ledger_path)
    # One commit per record_seen is the daemon's durability; here it would only make set-up slow.
    ledger._conn.execute("PRAGMA synchronous=OFF")
    rows = 0
    for directory in sorted(root.iterdir()):
        for entry in os.scandir(directory):
            info = entry.stat(follow_symlinks=False)
            ledger.record_seen(Path(entry.path), root, "bench", Version.of(info))
            rows += 1
    ledger.close()
    db = sqlite3.connect(ledger_path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    db.execute(
        "UPDATE files SET state = 'uploaded', prior_state = NULL, video_no = 'VI' || id, fingerprint = 'bench',"
        " uploaded_at = ?, updated_at = ?",
        [time.time(), time.time()],
    )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    say(
        f"  made {rows} files in {seconds(made - started)}, "
        f"their ledger rows in {seconds(time.monotonic() - made)}: {counts(ledger_path)}"
    )
    return root, ledger_path


class Sink:
    """bench/sink.py in its own process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(BENCH_DIR / "sink.py")], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=10) as answer:
            records: list[dict[str, Any]] = json.loads(answer.read())
        return [record for record in records if record["path"] == UPLOAD_PATH]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
