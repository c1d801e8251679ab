"""What a video's own tags say: when it was recorded, where, and with which camera.

Phones, cameras and editors each write these differently; every reading here is lenient about the spelling and
strict about the value, because the tags come from the file and a hostile one must not reach the upload as is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal

from .api import MAX_CAMERA_MODEL

# Tag keys, lowercased, best first. Phones write the QuickTime `mdta` keys; FFmpeg names the classic
# udta atoms (©xyz, ©mak, ©mod) location, make and model, and adds a "-eng"-style copy per language.
# Apple's creation date comes first: it survives edits and exports that rewrite the movie's creation_time.
_CREATION_KEYS = ("com.apple.quicktime.creationdate", "creation_time")


_LOCATION_KEYS = ("com.apple.quicktime.location.iso6709", "location")


_MAKE_KEYS = ("com.apple.quicktime.make", "make", "com.android.manufacturer", "manufacturer")


_MODEL_KEYS = ("com.apple.quicktime.model", "model", "com.android.model")


_ISO6709 = re.compile(
    r"(?P<latitude>[+-]\d+(?:\.\d*)?)(?P<longitude>[+-]\d+(?:\.\d*)?)"
    r"(?:[+-]\d+(?:\.\d*)?)?(?:CRS[\w:.-]*)?/?"
)


_COORDINATE_PLACES = Decimal("0.000001")


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
    return name[:MAX_CAMERA_MODEL].rstrip() or None


def _tag(tags: Mapping[str, str], key: str) -> str | None:
    """``key``'s value, else that of a language variant such as ``key-eng``."""
    if tags.get(key, "").strip():
        return tags[key]
    variant = re.compile(re.escape(key) + r"-[a-z]{3}")
    return next((value for name, value in tags.items() if variant.fullmatch(name) and value.strip()), None)


def _printable(text: str | None) -> str:
    # Camera firmware pads with NULs and spaces; the name goes into a form field.
    return " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", text or "").split())
