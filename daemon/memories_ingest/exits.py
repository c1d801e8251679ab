"""The exit codes of the `memories-ingest` command."""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    """Every exit code of the `memories-ingest` command, as sysexits(3) names them where one fits."""

    OK = 0
    # probe: the file would be rejected; upload: a file was not uploaded; demo: the sample did not arrive.
    NOT_UPLOADED = 1
    USAGE = 2
    # The ledger cannot be opened, or (check --online) the API cannot be reached.
    UNAVAILABLE = 69
    # Another daemon holds this ledger.
    LEDGER_HELD = 73
    # The ledger cannot be written: the disk is full, read-only or gone.
    LEDGER_WRITE = 74
    # The account refuses uploads (run --once, upload).
    PAUSED = 75
    # check --online: the API refused the key.
    KEY_REFUSED = 77
    # A bad config, or no usable API key.
    CONFIG = 78
