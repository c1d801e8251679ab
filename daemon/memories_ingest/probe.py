"""Decide whether a file is a video memories.ai will accept, before a byte is uploaded.

Cheap checks (name, size, magic bytes) run in the daemon. Everything that needs FFmpeg
runs in a short-lived child with CPU, memory and wall-clock limits, because FFmpeg parses
untrusted files and a hostile or broken one must cost a rejection, never the daemon. The
child is forked by the fork server in :mod:`memories_ingest.prober`, which has FFmpeg loaded
already; when that server cannot be had, it is a new interpreter
(``python -m memories_ingest.probe --fd N``).

The child reopens the file through ``/proc/self/fd/N``: it reads through its own file
description, so the caller's file offset is never moved (Linux only, like the daemon).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .files import NotRegular, require_regular

if TYPE_CHECKING:
    from av.codec.context import CodecContext
    from av.container import InputContainer
    from av.stream import Stream
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

VIDEO_EXTENSIONS = {
    ".mp4": "video/mp4",
    ".avi": "video/x-msvideo",
    ".mkv": "video/x-matroska",
    ".mov": "video/quicktime",
}
MAX_BYTES = 3 * 1024**3
ACCEPTED_CODECS = ("h264", "hevc", "vp9")

_GIB = 1024**3
_MIB = 1024**2
_NOT_A_CONTAINER = "content is not an MP4/MOV, MKV or AVI container"
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

# Tag keys, lowercased, best first. Phones write the QuickTime `mdta` keys; FFmpeg names the classic
# udta atoms (©xyz, ©mak, ©mod) location, make and model, and adds a "-eng"-style copy per language.
# Apple's creation date comes first: it survives edits and exports that rewrite the movie's creation_time.
_CREATION_KEYS = ("com.apple.quicktime.creationdate", "creation_time")
_LOCATION_KEYS = ("com.apple.quicktime.location.iso6709", "location")
_MAKE_KEYS = ("com.apple.quicktime.make", "make", "com.android.manufacturer", "manufacturer")
_MODEL_KEYS = ("com.apple.quicktime.model", "model", "com.android.model")
# The API's limit, as config.MAX_CAMERA_MODEL; the probe child does not load the config machinery.
_MAX_CAMERA_MODEL = 200
_ISO6709 = re.compile(
    r"(?P<latitude>[+-]\d+(?:\.\d*)?)(?P<longitude>[+-]\d+(?:\.\d*)?)"
    r"(?:[+-]\d+(?:\.\d*)?)?(?:CRS[\w:.-]*)?/?"
)
_COORDINATE_PLACES = Decimal("0.000001")


# What a probe process may see of the daemon's environment: enough to run Python, and nothing else. Not the
# API key's variable, not $CREDENTIALS_DIRECTORY, not NOTIFY_SOCKET: a hostile file is parsed in there.
_ENVIRONMENT_KEPT = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSAFEPATH",
        "PYTHONDONTWRITEBYTECODE",
    }
)


def probe_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment for the probe's processes: an allow-list of the daemon's."""
    return {name: value for name, value in environ.items() if name in _ENVIRONMENT_KEPT or name.startswith("LC_")}


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


def content_type_for(path: str | os.PathLike[str]) -> str | None:
    return VIDEO_EXTENSIONS.get(Path(path).suffix.lower())


def check_name(path: str | os.PathLike[str]) -> str | None:
    suffix = Path(path).suffix
    if suffix.lower() in VIDEO_EXTENSIONS:
        return None
    expected = ", ".join(sorted(VIDEO_EXTENSIONS))
    if not suffix:
        return f"the name has no extension; videos end in {expected}"
    return f"extension {suffix} is not a video extension ({expected})"


def check_header(fd: int, size: int) -> None:
    if size == 0:
        raise Rejection("file is empty")
    if size > MAX_BYTES:
        raise Rejection(f"file is {size / _GIB:.1f} GiB, over the {MAX_BYTES / _GIB:g} GiB limit")
    if _container_family(os.pread(fd, 12, 0)) is None:
        raise Rejection(_NOT_A_CONTAINER)


def probe_path(path: str | os.PathLike[str], *, require_audio: bool = False, timeout: float = 30.0) -> MediaInfo:
    """Check and probe the file at ``path``; raise :class:`Rejection` if it will not be uploaded.

    Only regular files are opened: a FIFO would block the open, and a symlink could point
    anywhere. ``OSError`` (the file vanished, no permission) propagates unchanged.
    """
    _require_regular_file(os.lstat(path).st_mode)
    # O_NONBLOCK: should the name be swapped for a FIFO after the lstat, the open still returns.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        _require_regular_file(status.st_mode)
        check_header(fd, status.st_size)
        return probe_fd(fd, require_audio=require_audio, timeout=timeout)
    finally:
        os.close(fd)


def probe_fd(
    fd: int,
    *,
    require_audio: bool = False,
    timeout: float = 30.0,
    cpu_seconds: int = 60,
    memory_bytes: int = 1 << 30,
) -> MediaInfo:
    """Run FFmpeg over the open regular file ``fd`` in a sandboxed child.

    The offset of ``fd`` is left untouched. Raises :class:`Rejection` when the file is not
    acceptable, including when it hangs, crashes or exhausts the child.
    """
    _require_regular_file(os.fstat(fd).st_mode)
    # Imported on first use, because the fork server imports this module.
    from . import prober

    try:
        return prober.probe_fd(
            fd, require_audio=require_audio, timeout=timeout, cpu_seconds=cpu_seconds, memory_bytes=memory_bytes
        )
    except prober.ProberUnavailable:
        return _probe_in_new_interpreter(
            fd, require_audio=require_audio, timeout=timeout, cpu_seconds=cpu_seconds, memory_bytes=memory_bytes
        )


def _probe_in_new_interpreter(
    fd: int, *, require_audio: bool, timeout: float, cpu_seconds: int, memory_bytes: int
) -> MediaInfo:
    command = [sys.executable, "-m", "memories_ingest.probe", "--fd", str(fd)]
    command += ["--cpu-seconds", str(cpu_seconds), "--memory-bytes", str(memory_bytes)]
    if require_audio:
        command.append("--require-audio")
    with subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(fd,),
        # `-m` puts the working directory first on the child's sys.path; it must not be a
        # folder where files arrive that could pass for modules.
        cwd="/",
        env=probe_environment(),
        start_new_session=True,
    ) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_process_group(child)
            raise timed_out(timeout) from None
        except BaseException:
            _kill_process_group(child)
            raise
    return read_answer(child.returncode, stdout, stderr, cpu_seconds)


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


def _require_regular_file(mode: int) -> None:
    try:
        require_regular(mode)
    except NotRegular as error:
        raise Rejection(str(error)) from None


def _container_family(head: bytes) -> str | None:
    if head[4:8] in _ISO_BMFF_BOX_TYPES:
        return "iso-bmff"
    if head.startswith(_EBML_MAGIC):
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


def _kill_process_group(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    child.communicate()


def timed_out(timeout: float) -> Rejection:
    return Rejection(f"probe timed out after {timeout:g} s")


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


# Everything below runs in the child.


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m memories_ingest.probe")
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
    family = _container_family(os.pread(fd, 12, 0))
    if family is None:
        raise Rejection(_NOT_A_CONTAINER)
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


def creation_time_from_tags(tags: Mapping[str, str], stream_tags: Iterable[Mapping[str, str]] = ()) -> datetime | None:
    """When the file says it was recorded: the first readable date in the container's tags, then the streams'.

    ``tags`` has lowercased keys, as in :attr:`MediaInfo.tags`.
    """
    candidates = [tags.get(key) for key in _CREATION_KEYS]
    candidates += [stream.get("creation_time") for stream in stream_tags]
    parsed = (parse_creation_time(candidate) for candidate in candidates if candidate)
    return next(filter(None, parsed), None)


def parse_creation_time(value: str) -> datetime | None:
    """Parse a creation_time tag ("2024-05-06T07:08:09.000000Z" and kin) as an aware UTC datetime."""
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    # Python 3.10 only reads 3 or 6 fractional digits; writers use anything from 1 to 9.
    text = re.sub(r"\.(\d+)", lambda digits: "." + digits.group(1)[:6].ljust(6, "0"), text, count=1)
    # Phones write the offset without a colon ("+0200"), which Python 3.10 does not read.
    text = re.sub(r"(:\d\d(?:\.\d+)?[+-]\d\d)(\d\d)$", r"\1:\2", text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def location_from_tags(tags: Mapping[str, str]) -> tuple[str, str] | None:
    """The first well-formed ISO 6709 location in ``tags`` (lowercased keys), as decimal latitude and longitude."""
    for key in _LOCATION_KEYS:
        text = _tag(tags, key)
        location = parse_iso6709(text) if text else None
        if location is not None:
            return location
    return None


def parse_iso6709(text: str) -> tuple[str, str] | None:
    """Parse an ISO 6709 point ("+51.5007-000.1246+012.000/") into decimal-degree strings, or None.

    Degrees, degrees and minutes (±DDMM.MM±DDDMM.MM) and degrees, minutes and seconds are read; the
    altitude and a coordinate reference system are ignored. Out-of-range values give None.
    """
    match = _ISO6709.fullmatch(text.strip())
    if match is None:
        return None
    latitude = _iso6709_angle(match["latitude"], degree_digits=2)
    longitude = _iso6709_angle(match["longitude"], degree_digits=3)
    if latitude is None or longitude is None or abs(latitude) > 90 or abs(longitude) > 180:
        return None
    # Devices without a fix write zeros rather than nothing; nobody films at exactly 0°, 0°.
    if latitude == 0 and longitude == 0:
        return None
    return _decimal_degrees(latitude), _decimal_degrees(longitude)


def _iso6709_angle(signed: str, *, degree_digits: int) -> Decimal | None:
    """One coordinate, whose integer digits tell its form: (D)DD, (D)DDMM or (D)DDMMSS."""
    unsigned = signed[1:]
    whole, _, fraction = unsigned.partition(".")
    fraction = f".{fraction}" if fraction else ""
    extra_digits = len(whole) - degree_digits
    if extra_digits <= 0:
        degrees, minutes, seconds = Decimal(unsigned), Decimal(0), Decimal(0)
    elif extra_digits == 2:
        degrees, minutes, seconds = Decimal(whole[:-2]), Decimal(whole[-2:] + fraction), Decimal(0)
    elif extra_digits == 4:
        degrees, minutes, seconds = Decimal(whole[:-4]), Decimal(whole[-4:-2]), Decimal(whole[-2:] + fraction)
    else:
        return None
    if minutes >= 60 or seconds >= 60:
        return None
    value = degrees + minutes / 60 + seconds / 3600
    return -value if signed[0] == "-" else value


def _decimal_degrees(value: Decimal) -> str:
    rounded = value.quantize(_COORDINATE_PLACES, rounding=ROUND_HALF_UP)
    return "0" if rounded == 0 else format(rounded.normalize(), "f")


def camera_model_from_tags(tags: Mapping[str, str]) -> str | None:
    """The camera as "Make Model", from the make and model tags in ``tags`` (lowercased keys), or None."""
    make = next(filter(None, (_printable(_tag(tags, key)) for key in _MAKE_KEYS)), None)
    model = next(filter(None, (_printable(_tag(tags, key)) for key in _MODEL_KEYS)), None)
    return camera_name(make, model)


def camera_name(make: str | None, model: str | None) -> str | None:
    """Join make and model, unless the model already names the make ("Canon", "Canon EOS R5")."""
    make, model = _printable(make), _printable(model)
    if make and model and not re.match(re.escape(make) + r"(?!\w)", model, re.IGNORECASE):
        name = f"{make} {model}"
    else:
        name = model or make
    return name[:_MAX_CAMERA_MODEL].rstrip() or None


def _tag(tags: Mapping[str, str], key: str) -> str | None:
    """``key``'s value, else that of a language variant such as ``key-eng``."""
    if tags.get(key, "").strip():
        return tags[key]
    variant = re.compile(re.escape(key) + r"-[a-z]{3}")
    return next((value for name, value in tags.items() if variant.fullmatch(name) and value.strip()), None)


def _printable(text: str | None) -> str:
    # Camera firmware pads with NULs and spaces; the name goes into a form field.
    return " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", text or "").split())


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
