"""What the upload workers report as it happens, counted for Prometheus."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from .api import Outcome

# From a short clip on a fast link (1 s) to a 3 GiB file on a slow one (1 h).
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
# Listed up front so that every series exists, at 0, before the first one happens.
RETRY_REASONS = (
    "rate_limited",
    "transient",
    "account",
    "refused",
    "duplicate",
    "unrecognised",
    "changed",
    "abandoned",
)


class Metrics:
    """What the upload workers report as it happens, in a registry of the daemon's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.uploaded_bytes = Counter(
            "memories_ingest_uploaded_bytes", "Bytes of the files the API accepted", registry=self.registry
        )
        self.upload_duration = Histogram(
            "memories_ingest_upload_duration_seconds",
            "How long each accepted upload took, from its first byte to the API's answer",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "memories_ingest_upload_retries",
            "Upload attempts that did not deliver the file, by reason; a refused file is not tried again",
            ["reason"],
            registry=self.registry,
        )
        for reason in RETRY_REASONS:
            self.retries.labels(reason)
        self.duplicates = Counter(
            "memories_ingest_duplicate_uploads",
            "Videos the server holds twice for one file, found while checking an upload whose answer was lost",
            registry=self.registry,
        )
        self.possible_duplicates = Counter(
            "memories_ingest_possible_duplicate_uploads",
            "Uploads sent again after 6 h in which list_videos could neither prove nor rule out that they landed",
            registry=self.registry,
        )

    def duplicates_found(self, count: int) -> None:
        self.duplicates.inc(count)

    def possible_duplicate(self) -> None:
        self.possible_duplicates.inc()

    def uploaded(self, size: int, seconds: float) -> None:
        self.uploaded_bytes.inc(size)
        self.upload_duration.observe(seconds)

    def retried(self, reason: str) -> None:
        self.retries.labels(reason).inc()

    def answered(self, outcome: Outcome, size: int, seconds: float) -> None:
        if outcome.kind == "uploaded":
            self.uploaded(size, seconds)
        else:
            self.retried(outcome.kind)
