"""Trying it out with no account: one file's verdict, the API's emulator, and the demo."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from . import probe
from .commands import row_json
from .config import parse
from .exits import Exit
from .ledger import Ledger
from .service import Daemon
from .signals import Signals
from .states import UPLOADED
from .uploader import Client


def cmd_probe(args: argparse.Namespace) -> int:
    path = Path(args.file)
    reason = probe.check_name(path)
    if reason is None:
        try:
            media = probe.probe_path(path, require_audio=args.require_audio)
        except probe.Rejection as rejection:
            reason = str(rejection)
        else:
            print(json.dumps({"path": str(path.absolute()), "accepted": True, **media.to_json()}, indent=2))
            return Exit.OK
    print(json.dumps({"path": str(path.absolute()), "accepted": False, "reason": reason}, indent=2))
    return Exit.NOT_UPLOADED


def cmd_sandbox(args: argparse.Namespace) -> int:
    from .sandbox import serve

    serve(args.host, args.port, args.api_key, dialect=args.dialect, rate_per_second=args.upload_rate)
    return Exit.OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .samples import write_video
    from .sandbox import Sandbox

    demo_key = "demo-key"
    with (
        tempfile.TemporaryDirectory(prefix="memories-ingest-demo-") as tmp,
        Sandbox(api_key=demo_key) as sandbox,
    ):
        watch = Path(tmp) / "camera"
        watch.mkdir()
        config = parse(
            {
                "api": {"base_url": sandbox.url},
                "ledger": str(Path(tmp) / "ledger.db"),
                "watch": {"settle_seconds": 1},
                "defaults": {"tags": ["demo"]},
                "folders": [
                    {
                        "path": str(watch),
                        "unique_id": "demo-garden",
                        "tags": ["garden"],
                        "camera_model": "Demo Cam",
                        "latitude": 51.5007,
                        "longitude": -0.1246,
                    }
                ],
            },
            Path(tmp) / "config.yaml",
        )
        print(f"sandbox API at {sandbox.url}, watching {watch}", file=sys.stderr)
        ledger = Ledger(config.ledger)
        client = Client(config.api.base_url, demo_key)
        daemon = Daemon(
            config, ledger, client, once=False, grace_seconds=config.upload.shutdown_grace_seconds, signals=Signals()
        )
        runner = threading.Thread(target=daemon.run, name="daemon")
        runner.start()
        target = watch / "garden.mp4"
        recorded = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000000Z")
        partial = write_video(watch / "garden.mp4.part", seconds=2, audio=True, metadata={"creation_time": recorded})
        partial.rename(target)
        deadline = time.monotonic() + 60
        row = ledger.get(target)
        while (row is None or row.state != UPLOADED) and time.monotonic() < deadline:
            daemon.events.stop.wait(0.2)
            row = ledger.get(target)
        daemon.request_stop()
        runner.join()
        client.close()
        ledger.close()
        if row is None or row.state != UPLOADED:
            print(f"demo failed: the video did not reach the sandbox (row: {row})", file=sys.stderr)
            return Exit.NOT_UPLOADED
        print("ledger row:")
        print(json.dumps(row_json(row), indent=2))
        print("the sandbox received:")
        for video in sandbox.received():
            print(json.dumps({**video.__dict__}, indent=2, default=str))
    return Exit.OK
