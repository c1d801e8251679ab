"""Small, real videos made with PyAV, for the demo command and the tests.

Every file is a genuine encode (a solid colour that changes each frame), so the probe
sees exactly what a camera or NAS would hand it, only tiny and fast to make.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

import av

from memories_ingest.inspector import iter_top_level_boxes

ENCODERS = {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9", "mpeg4": "mpeg4"}
MUXERS_BY_EXTENSION = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi"}

# Speed over quality: the samples only need to be valid, and benchmarks make big ones.
_ENCODER_OPTIONS = {
    "libx264": {"preset": "ultrafast"},
    "libx265": {"preset": "ultrafast", "x265-params": "log-level=error"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"},
    "mpeg4": {},
}
_ISO_BMFF_MUXERS = ("mp4", "mov")
_AUDIO_SAMPLE_RATE = 48_000
_PADDING_BLOCK = memoryview(bytes(8 << 20))


def write_video(
    path: str | os.PathLike[str],
    *,
    codec: str = "h264",
    container: str | None = None,
    seconds: float = 1.0,
    fps: int = 10,
    size: tuple[int, int] = (64, 64),
    audio: bool = False,
    metadata: Mapping[str, str] | None = None,
    faststart: bool = False,
    muxer_options: Mapping[str, str] | None = None,
) -> Path:
    """Write a short video and return its path.

    ``container`` is an FFmpeg muxer name ("mp4", "mov", "matroska", "avi"); by default it
    follows the last video extension in the name, in any case, so ``clip.MP4`` and
    ``clip.mp4.part`` (written, then renamed into place) both work. ``faststart`` puts the
    moov box before the media data (mp4 and mov only), as :func:`faststart_padding` needs.
    ``muxer_options`` are FFmpeg muxer options over the defaults, e.g. ``{"movflags": "-use_metadata_tags"}``
    to keep only the tags with a classic QuickTime atom (location, make, model), as most cameras write them.
    """
    target = Path(path)
    muxer = container or _muxer_named_by(target)
    if codec not in ENCODERS:
        raise ValueError(f"codec {codec!r} is not one of {', '.join(ENCODERS)}")
    width, height = size
    if width % 2 or height % 2:
        raise ValueError(f"size {width}x{height} must be even for 4:2:0 video")
    if faststart and muxer not in _ISO_BMFF_MUXERS:
        raise ValueError(f"faststart needs an mp4 or mov container, not {muxer}")

    options = {**_default_muxer_options(muxer, faststart=faststart, tagged=bool(metadata)), **(muxer_options or {})}
    encoder = ENCODERS[codec]
    with av.open(target, "w", format=muxer, options=options) as output:
        output.metadata.update(metadata or {})
        video = output.add_stream(encoder, rate=fps, options=_ENCODER_OPTIONS[encoder])
        video.width, video.height = width, height
        video.pix_fmt = "yuv420p"
        sound = output.add_stream("mp2" if muxer == "avi" else "aac", rate=_AUDIO_SAMPLE_RATE) if audio else None
        if sound is not None:
            sound.layout = "mono"
            sound.bit_rate = 64_000

        frame_count = max(1, round(seconds * fps))
        for index in range(frame_count):
            output.mux(video.encode(_solid_frame(width, height, index, fps)))
        output.mux(video.encode(None))

        if sound is not None:
            _mux_silence(output, sound, round(frame_count / fps * _AUDIO_SAMPLE_RATE))
    return target


def _muxer_named_by(target: Path) -> str:
    named_muxers = [MUXERS_BY_EXTENSION.get(suffix.lower()) for suffix in reversed(target.suffixes)]
    muxer = next(filter(None, named_muxers), None)
    if muxer is None:
        raise ValueError(f"cannot tell the container of {target.name}; pass container=")
    return muxer


def _default_muxer_options(muxer: str, *, faststart: bool, tagged: bool) -> dict[str, str]:
    if muxer not in _ISO_BMFF_MUXERS:
        return {}
    # Without use_metadata_tags the mp4 muxer drops keys it has no atom for (make, model...).
    flags = ["faststart"] if faststart else []
    if tagged:
        flags.append("use_metadata_tags")
    return {"movflags": "+".join(flags)} if flags else {}


def _mux_silence(output: av.container.OutputContainer, sound: av.AudioStream, total_samples: int) -> None:
    sample_format = sound.codec_context.format.name
    samples_per_frame = 1024
    for start in range(0, total_samples, samples_per_frame):
        silence = av.AudioFrame(format=sample_format, layout="mono", samples=samples_per_frame)
        silence.sample_rate = _AUDIO_SAMPLE_RATE
        silence.pts = start
        silence.time_base = Fraction(1, _AUDIO_SAMPLE_RATE)
        for plane in silence.planes:
            plane.update(bytes(plane.buffer_size))
        output.mux(sound.encode(silence))
    output.mux(sound.encode(None))


def _solid_frame(width: int, height: int, index: int, fps: int) -> av.VideoFrame:
    frame = av.VideoFrame(width, height, "yuv420p")
    luma, blue, red = (index * 37) % 256, (128 + index * 61) % 256, (64 + index * 89) % 256
    for plane, value in zip(frame.planes, (luma, blue, red), strict=True):
        plane.update(bytes([value]) * plane.buffer_size)
    frame.pts = index
    frame.time_base = Fraction(1, fps)
    return frame


def faststart_padding(path: str | os.PathLike[str], total_bytes: int, *, sparse: bool = True) -> Path:
    """Grow a faststart MP4/MOV to exactly ``total_bytes`` by appending a ``free`` box.

    Players and FFmpeg skip ``free`` boxes, so the file stays valid. ``sparse`` leaves the
    padding as a hole (instant, no disk used); benchmarks that must really read the bytes
    pass ``sparse=False`` to write zeros.
    """
    target = Path(path)
    with open(target, "r+b") as file:
        current_size = os.fstat(file.fileno()).st_size
        box_order = [box.kind for box in iter_top_level_boxes(file.fileno(), current_size)]
        if "moov" not in box_order or "mdat" not in box_order or box_order.index("moov") > box_order.index("mdat"):
            raise ValueError(f"{target.name} is not a faststart MP4 (moov must come before mdat)")

        padding = total_bytes - current_size
        if padding == 0:
            return target
        if padding < 8:
            raise ValueError(f"{target.name} is {current_size} bytes; padding needs at least 8 more")
        if padding <= 0xFFFF_FFFF:
            header = struct.pack(">I4s", padding, b"free")
        else:
            header = struct.pack(">I4sQ", 1, b"free", padding)

        file.seek(current_size)
        file.write(header)
        if sparse:
            file.truncate(total_bytes)
        else:
            remaining = padding - len(header)
            while remaining:
                remaining -= file.write(_PADDING_BLOCK[: min(remaining, len(_PADDING_BLOCK))])
    return target
