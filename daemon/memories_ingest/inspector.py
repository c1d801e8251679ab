"""The probe's child: it opens one untrusted file with FFmpeg, under resource limits, and answers on stdout.

It runs forked from the prober's zygote, or as ``python -m memories_ingest.inspector --fd N``; the daemon
itself never loads FFmpeg. It reopens the file through ``/proc/self/fd/N``, so the caller's file offset is
never moved (Linux only, like the daemon). Its one line of JSON is read back by :func:`read_answer`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from .metadata import camera_model_from_tags, creation_time_from_tags, location_from_tags

if TYPE_CHECKING:
    from av.codec.context import CodecContext
    from av.container import InputContainer
    from av.stream import Stream
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

ACCEPTED_CODECS = ("h264", "hevc", "vp9")

_MIB = 1024**2

NOT_A_CONTAINER = "content is not an MP4/MOV, MKV or AVI container"

_ISO_BMFF_BOX_TYPES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid"}

_EBML_MAGIC = b"\x1a\x45\xdf\xa3"

_MATROSKA_SEGMENT_ID = b"\x18\x53\x80\x67"

# The demuxer is forced from the magic bytes, so FFmpeg never probes its way into a
# playlist or concat demuxer that would open other files or URLs.
_DEMUXER_BY_FAMILY = {"iso-bmff": "mov,mp4,m4a,3gp,3g2,mj2", "matroska": "matroska,webm", "avi": "avi"}

# A stream that has not produced a picture after this many packets is not worth waiting for.
_PACKETS_BEFORE_FIRST_FRAME = 300

# Tags come from the file, so a hostile one must not bloat the answer or the upload request.
_MAX_TAGS = 100

_MAX_TAG_CHARS = 1000

_ATTACHED_PICTURE = 0x0400  # AV_DISPOSITION_ATTACHED_PIC: cover art, not the video


class Rejection(Exception):
    """The file will not be uploaded; ``str(rejection)`` is the reason, written for humans."""


@dataclass(frozen=True)
class MediaInfo:
    container: str
    video_codec: str
    audio_codec: str | None
    width: int
    height: int
    duration: float | None
    creation_time: datetime | None
    tags: dict[str, str] = field(default_factory=dict)
    latitude: str | None = None
    longitude: str | None = None
    camera_model: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "video_codec": self.video_codec,
            "audio_codec": self.audio_codec,
            "width": self.width,
            "height": self.height,
            "duration": self.duration,
            "creation_time": self.creation_time.isoformat() if self.creation_time else None,
            "latitude": self.latitude,
            "longitude": self.longitude,
            "camera_model": self.camera_model,
            "tags": dict(self.tags),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MediaInfo:
        creation_time = data.get("creation_time")
        duration = data.get("duration")
        audio_codec = data.get("audio_codec")
        tags = {str(key): str(value) for key, value in data.get("tags", {}).items()}
        # Rows stored before these keys existed still hold the tags they come from.
        if "latitude" in data:
            latitude, longitude = _optional_text(data["latitude"]), _optional_text(data.get("longitude"))
        else:
            latitude, longitude = location_from_tags(tags) or (None, None)
        camera = _optional_text(data["camera_model"]) if "camera_model" in data else camera_model_from_tags(tags)
        return cls(
            container=str(data["container"]),
            video_codec=str(data["video_codec"]),
            audio_codec=_optional_text(audio_codec),
            width=int(data["width"]),
            height=int(data["height"]),
            duration=None if duration is None else float(duration),
            creation_time=None if creation_time is None else datetime.fromisoformat(creation_time),
            tags=tags,
            latitude=latitude,
            longitude=longitude,
            camera_model=camera,
        )


class Box(NamedTuple):
    """A top-level ISO-BMFF box: its four-character type and where it starts and ends."""

    kind: str
    start: int
    end: int


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def iter_top_level_boxes(fd: int, size: int) -> Iterator[Box]:
    """Walk the top-level boxes of an ISO-BMFF file of ``size`` bytes, using pread only.

    A box may claim to end past ``size``; callers decide what that means. Trailing bytes
    too short to hold a box header are ignored.
    """
    offset = 0
    while size - offset >= 8:
        header = os.pread(fd, 16, offset)
        box_size, kind = struct.unpack(">I4s", header[:8])
        header_size = 8
        if box_size == 1 and len(header) == 16:
            (box_size,) = struct.unpack(">Q", header[8:])
            header_size = 16
        elif box_size == 0:
            box_size = size - offset
        if box_size < header_size:
            raise Rejection(f"the file is truncated or corrupt: the box at byte {offset} has size {box_size}")
        yield Box(kind.decode("latin-1"), offset, offset + box_size)
        offset += box_size


def container_family(head: bytes) -> str | None:
    if head[4:8] in _ISO_BMFF_BOX_TYPES:
        return "iso-bmff"
    if head.startswith(_EBML_MAGIC):
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


def read_answer(returncode: int, stdout: bytes, stderr: bytes, cpu_seconds: int) -> MediaInfo:
    """The child's verdict, from how it ended and what it wrote; raises :class:`Rejection` for all but success."""
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    answer: object = None
    if returncode == 0 and lines:
        try:
            answer = json.loads(lines[-1])
        except ValueError:
            answer = None
    if isinstance(answer, dict):
        if "ok" in answer:
            return MediaInfo.from_json(answer["ok"])
        if "rejected" in answer:
            raise Rejection(str(answer["rejected"]))
    if returncode == -signal.SIGXCPU:
        raise Rejection(f"probing needed more than {cpu_seconds} s of CPU time")
    if returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        raise Rejection(f"the file crashed the probe (signal {number}, {name})")
    last_error = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no error output"]
    raise Rejection(f"the probe failed (exit status {returncode}): {last_error[0][:300]}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m memories_ingest.inspector")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--cpu-seconds", type=int, default=60)
    parser.add_argument("--memory-bytes", type=int, default=1 << 30)
    parser.add_argument("--require-audio", action="store_true")
    arguments = parser.parse_args(argv)
    answer_on_stdout(
        arguments.fd,
        require_audio=arguments.require_audio,
        cpu_seconds=arguments.cpu_seconds,
        memory_bytes=arguments.memory_bytes,
    )
    return 0


def answer_on_stdout(fd: int, *, require_audio: bool, cpu_seconds: int, memory_bytes: int) -> None:
    """Take the child's resource limits, probe ``fd`` and write the one-line answer that :func:`read_answer` reads."""
    _limit_resources(cpu_seconds, memory_bytes)
    answer: dict[str, Any]
    try:
        answer = {"ok": _probe_in_child(fd, require_audio=require_audio).to_json()}
    except Rejection as rejection:
        answer = {"rejected": str(rejection)}
    except MemoryError:
        answer = {"rejected": f"probing needed more than {memory_bytes / _MIB:g} MiB of memory"}
    sys.stdout.write(json.dumps(answer) + "\n")


def _limit_resources(cpu_seconds: int, memory_bytes: int) -> None:
    # The soft CPU limit sends SIGXCPU; the hard one, a second later, SIGKILL.
    _lower_limit(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1)
    _lower_limit(resource.RLIMIT_AS, memory_bytes, memory_bytes)
    # No core dump of a hostile file; and the probe writes no files (its answer goes to a
    # pipe), so a subverted decoder cannot write any either.
    _lower_limit(resource.RLIMIT_CORE, 0, 0)
    _lower_limit(resource.RLIMIT_FSIZE, 0, 0)


def _lower_limit(kind: int, soft: int, hard: int) -> None:
    _, current_hard = resource.getrlimit(kind)
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(kind, (soft, hard))


def _probe_in_child(fd: int, *, require_audio: bool) -> MediaInfo:
    size = os.fstat(fd).st_size
    family = container_family(os.pread(fd, 12, 0))
    if family is None:
        raise Rejection(NOT_A_CONTAINER)
    _check_declared_extent(fd, size, family)

    # Imported here so the daemon itself never loads FFmpeg.
    import av

    av.logging.set_level(av.logging.ERROR)
    try:
        with av.open(
            f"/proc/self/fd/{fd}",
            format=_DEMUXER_BY_FAMILY[family],
            options={"protocol_whitelist": "file"},
            metadata_errors="replace",
        ) as container:
            return _describe(container, require_audio=require_audio)
    except MemoryError:
        # av.error.MemoryError is also an FFmpegError, but it means the limit, not a bad file.
        raise
    except av.FFmpegError as error:
        # FFmpeg's own last error line says most ("moov atom not found"). The stubs describe
        # `log` wrongly: at run time it is (level, component, message), or None.
        last_log: Any = error.log
        detail = last_log[2].strip() if last_log else (error.strerror or str(error))
        raise Rejection(f"the file is truncated or corrupt: {detail}") from None


def _check_declared_extent(fd: int, size: int, family: str) -> None:
    """Reject a file whose container says it is longer than it is: a cut copy or an unfinished write.

    Decoding the first frame cannot tell: the cut may come after it.
    """
    if family == "iso-bmff":
        for box in iter_top_level_boxes(fd, size):
            if box.end > size:
                raise _truncated(f"the {box.kind} box ends at byte {box.end}", size)
    elif family == "matroska":
        segment_end = _matroska_segment_end(fd)
        if segment_end is not None and segment_end > size:
            raise _truncated(f"the Matroska segment ends at byte {segment_end}", size)
    else:
        offset = 0
        while True:
            header = os.pread(fd, 12, offset)
            if len(header) < 12 or header[:4] != b"RIFF":
                break
            (chunk_size,) = struct.unpack("<I", header[4:8])
            offset += 8 + chunk_size + chunk_size % 2
            if offset > size:
                raise _truncated(f"the RIFF chunk ends at byte {offset}", size)


def _truncated(claim: str, size: int) -> Rejection:
    return Rejection(f"the file is truncated or corrupt: {claim} but the file has {size} bytes")


def _matroska_segment_end(fd: int) -> int | None:
    """Where the Segment after the EBML header ends, or None when unknown (live recordings)."""
    header_size_length, header_size, _ = _ebml_vint(os.pread(fd, 8, 4))
    segment_start = 4 + header_size_length + header_size
    head = os.pread(fd, 12, segment_start)
    if head[:4] != _MATROSKA_SEGMENT_ID:
        return None
    size_length, segment_size, unknown = _ebml_vint(head[4:])
    return None if unknown else segment_start + 4 + size_length + segment_size


def _ebml_vint(data: bytes) -> tuple[int, int, bool]:
    """Decode an EBML variable-length size: (its length in bytes, value, whether it means 'unknown')."""
    if not data or data[0] == 0:
        raise Rejection("the file is truncated or corrupt: invalid EBML element size")
    length = 9 - data[0].bit_length()
    if len(data) < length:
        raise Rejection("the file is truncated or corrupt: the EBML header is cut short")
    value = int.from_bytes(data[:length], "big") & ((1 << (7 * length)) - 1)
    return length, value, value == (1 << (7 * length)) - 1


def _describe(container: InputContainer, *, require_audio: bool) -> MediaInfo:
    videos = [stream for stream in container.streams.video if not stream.disposition & _ATTACHED_PICTURE]
    if not videos:
        raise Rejection("no video stream")
    accepted = [stream for stream in videos if _codec_name(stream) in ACCEPTED_CODECS]
    if not accepted:
        raise Rejection(f"video codec {_codec_name(videos[0])} is not one of {', '.join(ACCEPTED_CODECS)}")
    video = accepted[0]
    audio = next(iter(container.streams.audio), None)
    if audio is None and require_audio:
        raise Rejection("no audio track, and this folder requires one")

    first_frame = _decode_first_frame(container, video)
    tags = {key.lower(): value[:_MAX_TAG_CHARS] for key, value in list(container.metadata.items())[:_MAX_TAGS]}
    latitude, longitude = location_from_tags(tags) or (None, None)
    return MediaInfo(
        container=container.format.name,
        video_codec=_codec_name(video),
        audio_codec=None if audio is None else _codec_name(audio),
        width=first_frame.width,
        height=first_frame.height,
        duration=_duration(container, video),
        creation_time=creation_time_from_tags(tags, (stream.metadata for stream in container.streams)),
        tags=tags,
        latitude=latitude,
        longitude=longitude,
        camera_model=camera_model_from_tags(tags),
    )


def _codec_name(stream: Stream) -> str:
    # The stubs promise a codec context, but PyAV leaves it None when FFmpeg has no decoder.
    context: CodecContext | None = stream.codec_context
    return "unknown" if context is None else context.codec.canonical_name


def _decode_first_frame(container: InputContainer, video: VideoStream) -> VideoFrame:
    # One thread: a probe decodes a single frame, and every extra thread reserves address
    # space counted against the memory limit.
    video.codec_context.thread_count = 1
    for packet_number, packet in enumerate(container.demux(video)):
        frames = packet.decode()
        if frames:
            return frames[0]
        if packet_number >= _PACKETS_BEFORE_FIRST_FRAME:
            break
    raise Rejection("the file is truncated or corrupt: no video frame could be decoded")


def _duration(container: InputContainer, video: VideoStream) -> float | None:
    if container.duration is not None and container.duration > 0:
        return float(container.duration / 1_000_000)
    if video.duration is not None and video.time_base is not None:
        return float(video.duration * video.time_base)
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
