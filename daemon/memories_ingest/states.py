"""The states a file passes through, what each means, and every change from one to another that may happen.

The ledger makes every change of state through `check`, so a change this table does not allow raises instead of
leaving a row somewhere nothing will ever look for it. The README's table of states is checked against MEANINGS.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum


class State(str, Enum):
    PENDING = "pending"
    QUEUED = "queued"
    UPLOADING = "uploading"
    RETRYING = "retrying"
    UNCERTAIN = "uncertain"
    UPLOADED = "uploaded"
    INDEXED = "indexed"
    INDEX_FAILED = "index_failed"
    REJECTED = "rejected"
    FAILED = "failed"
    GONE = "gone"

    def __str__(self) -> str:
        return self.value


PENDING, QUEUED, UPLOADING, RETRYING, UNCERTAIN = (
    State.PENDING,
    State.QUEUED,
    State.UPLOADING,
    State.RETRYING,
    State.UNCERTAIN,
)
UPLOADED, INDEXED, INDEX_FAILED, REJECTED, FAILED, GONE = (
    State.UPLOADED,
    State.INDEXED,
    State.INDEX_FAILED,
    State.REJECTED,
    State.FAILED,
    State.GONE,
)
STATES = tuple(State)
# memories.ai has the file: it has a videoNo.
DELIVERED = (UPLOADED, INDEXED, INDEX_FAILED)
# Claimable for an upload once next_attempt_at has come: an uncertain row is first checked with list_videos.
DUE = (QUEUED, RETRYING, UNCERTAIN)
# What `retry` puts back in the queue: what failed, was refused, waits, or went away.
RETRYABLE = (FAILED, REJECTED, RETRYING, UNCERTAIN, GONE)

MEANINGS: Mapping[State, str] = {
    PENDING: "seen; settling or being validated",
    QUEUED: "valid, waiting for an upload slot",
    UPLOADING: "being sent now, by the process named in `claimed_by`",
    RETRYING: "waiting for its next attempt at `next_attempt_at`",
    UNCERTAIN: "its whole body went out and no answer was stored: list_videos is asked, at `next_attempt_at`, "
    "whether it landed; `error` says what is still unproven",
    UPLOADED: "the server gave a videoNo",
    INDEXED: "memories.ai parsed the upload",
    INDEX_FAILED: "memories.ai could not parse the upload; `error` has its cause",
    REJECTED: "failed validation; `error` says why",
    FAILED: "the server refused it for a reason retrying cannot fix",
    GONE: "deleted before or during its upload; it is not retried, and if it comes back it is new",
}

# Every change of state there is, from each state. A file that is seen again (changed, touched, back from gone)
# settles again from any state but `uploading`, whose process finds out itself. `rebuild` records as uploaded any
# file that is not being uploaded; a copy of delivered content takes its original's state from `pending`.
_SEEN_AGAIN = frozenset({PENDING})
_REBUILT = frozenset({UPLOADED})
ALLOWED: Mapping[State, frozenset[State]] = {
    PENDING: frozenset({QUEUED, REJECTED, GONE, *DELIVERED}),
    QUEUED: frozenset({UPLOADING, GONE}) | _SEEN_AGAIN | _REBUILT,
    UPLOADING: frozenset({UPLOADED, RETRYING, UNCERTAIN, QUEUED, PENDING, FAILED, REJECTED, GONE}),
    RETRYING: frozenset({UPLOADING, GONE}) | _SEEN_AGAIN | _REBUILT,
    UNCERTAIN: frozenset({UPLOADING}) | _SEEN_AGAIN | _REBUILT,
    UPLOADED: frozenset({INDEXED, INDEX_FAILED}) | _SEEN_AGAIN,
    INDEXED: _SEEN_AGAIN,
    INDEX_FAILED: frozenset({INDEXED}) | _SEEN_AGAIN,
    REJECTED: _SEEN_AGAIN | _REBUILT,
    FAILED: _SEEN_AGAIN | _REBUILT,
    GONE: _SEEN_AGAIN | _REBUILT,
}


class IllegalChange(Exception):
    """A change of state the table does not allow: a bug, caught before it strands a row."""


def check(current: str, to: str) -> None:
    """Raise IllegalChange unless a row may go from `current` to `to`; staying where it is is not a change."""
    if current != to and State(to) not in ALLOWED[State(current)]:
        raise IllegalChange(f"a file cannot go from {current} to {to}")
