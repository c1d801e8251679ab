"""The systemd unit: it verifies, and its hardening keeps the offline exposure score at 2.0 or less."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "memories-ingest.service"
ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


@needs_systemd
def test_the_offline_security_exposure_is_at_most_2() -> None:
    result = subprocess.run(
        [str(ANALYZE), "security", "--offline=true", str(UNIT)], capture_output=True, text=True, check=False
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


@needs_systemd
def test_the_unit_verifies(tmp_path: Path) -> None:
    executable = tmp_path / "memories-ingest"
    executable.write_text(f"#!{sys.executable}\n")
    executable.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/memories-ingest/bin/memories-ingest", str(executable)))
    result = subprocess.run([str(ANALYZE), "verify", str(unit)], capture_output=True, text=True, check=False)
    problems = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert result.returncode == 0 and problems == [], result.stderr


def test_the_unit_is_a_notify_service_with_a_watchdog_and_a_credential() -> None:
    text = UNIT.read_text()
    # check runs before the HUP, so that a bad config fails the reload where an operator sees it.
    assert text.index("ExecReload=/opt/") < text.index("ExecReload=/bin/kill")
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StateDirectory=memories-ingest",
        "ConfigurationDirectory=memories-ingest",
        "LoadCredential=api-key:",
        "ExecReload=/opt/memories-ingest/bin/memories-ingest check -c /etc/memories-ingest/config.yaml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RestartPreventExitStatus=69 73 74 78",
        "User=memories-ingest",
    ):
        assert f"\n{line}" in text, line
