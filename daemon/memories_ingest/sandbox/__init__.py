"""A stand-in for the memories.ai API, served over loopback for the tests, the demo and anyone trying the daemon.

It answers as the vendor documents: in v1.2's string codes on HTTP 200 by default, or in the newer API's integer
codes equal to the HTTP status, with the vendor's own texts (see :mod:`memories_ingest.api`). Where the vendor
documents no code (the indexing cap, a server error, an unknown path), the sandbox uses codes of its own that
begin with S in v1.2, and says so. It enforces every documented upload rule and a per-account upload rate, which
can be far slower than 1 per second, and it can inject what a real network and a real vendor do to a client
(rate limits, 5xx answers, resets, stalls, trickling reads, duplicate refusals), so that the daemon's handling of
each is exercised over real HTTP.

Like the real API, it names each stored video itself (a hex string unrelated to the file name), files an upload
without a unique_id under the scope ``default``, lists a video's tags only once it is parsed, and spells a failed
parse PARSE_ERROR.
"""

from .codes import ANSWER_NAMES
from .command import parse_rate, serve
from .listing import API_TAG
from .records import ReceivedVideo, RequestRecord
from .server import ACCOUNT_STATES, FAULT_PARAMS, LIST_PATH, MAX_FILE_BYTES, UPLOAD_PATH, VIDEO_NAMES, Sandbox

__all__ = [
    "ACCOUNT_STATES",
    "ANSWER_NAMES",
    "API_TAG",
    "FAULT_PARAMS",
    "LIST_PATH",
    "MAX_FILE_BYTES",
    "UPLOAD_PATH",
    "VIDEO_NAMES",
    "ReceivedVideo",
    "RequestRecord",
    "Sandbox",
    "parse_rate",
    "serve",
]
