"""memories-ingest: watch folders and upload every good video to memories.ai exactly once."""

__version__ = "0.1.0"
