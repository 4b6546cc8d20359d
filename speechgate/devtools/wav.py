"""Reading a WAV file as what Azure Speech and the plain front door take: 16 kHz, 16-bit, mono PCM.

Other PCM WAVs (8/16/24/32-bit, any rate, any channel count) are converted: channels averaged,
then resampled by linear interpolation, which is plenty for speech recognition.
"""

from __future__ import annotations

import array
import struct
import sys
from pathlib import Path

RATE = 16_000


class WavError(ValueError):
    """The file cannot be used; the message says why and what to do."""


def _to_int16(frames: bytes, width: int) -> array.array[int]:
    if width == 2:
        samples = array.array("h", frames)
        if sys.byteorder == "big":
            samples.byteswap()
        return samples
    if width == 1:  # unsigned 8-bit
        return array.array("h", ((b - 128) << 8 for b in frames))
    if width in (3, 4):  # keep the top 16 bits of each little-endian sample
        return array.array(
            "h",
            (
                int.from_bytes(frames[i + width - 2 : i + width], "little", signed=True)
                for i in range(0, len(frames), width)
            ),
        )
    raise WavError(f"{width * 8}-bit samples are not supported; use 16-bit PCM")


def _mono(samples: array.array[int], channels: int) -> array.array[int]:
    if channels == 1:
        return samples
    return array.array(
        "h", (sum(samples[i : i + channels]) // channels for i in range(0, len(samples), channels))
    )


def resample(samples: array.array[int], rate: int, to: int = RATE) -> array.array[int]:
    """`samples` at `rate` as samples at `to`, by linear interpolation."""
    if rate == to or not samples:
        return samples
    count = len(samples) * to // rate
    step = rate / to
    last = len(samples) - 1
    out = array.array("h", bytes(2 * count))
    for i in range(count):
        position = i * step
        j = int(position)
        a = samples[j]
        b = samples[j + 1] if j < last else a
        out[i] = int(a + (b - a) * (position - j))
    return out


CONVERT = "convert it, e.g. with `ffmpeg -i IN -ar 16000 -ac 1 -c:a pcm_s16le OUT.wav`"
_FORMATS = {3: "floating-point", 6: "A-law", 7: "mu-law", 0x55: "MP3"}


def read_pcm16k(path: Path) -> bytes:
    """The file's audio as 16 kHz 16-bit mono little-endian PCM."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WavError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise WavError(f"{path}: is a directory, not a WAV file") from None
    width, channels, rate, frames = parse_wav(data, str(path))
    if not frames:
        raise WavError(f"{path}: the file holds no audio")
    return _to_bytes(resample(_mono(_to_int16(frames, width), channels), rate))


def parse_wav(data: bytes, name: str) -> tuple[int, int, int, bytes]:
    """Sample width (bytes), channels, rate and sample bytes of a PCM WAV, plain or
    WAVE_FORMAT_EXTENSIBLE (what sox and most recorders write beyond 16 bits or 2 channels)."""
    if not data:
        raise WavError(f"{name}: the file is empty, not a WAV file")
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError(f"{name}: not a WAV file (no RIFF/WAVE header); {CONVERT}")
    fmt: bytes | None = None
    frames: bytes | None = None
    at = 12
    while at + 8 <= len(data) and (fmt is None or frames is None):
        chunk, size = data[at : at + 4], int.from_bytes(data[at + 4 : at + 8], "little")
        body = data[at + 8 : at + 8 + size]  # a size past the end (a WAV written to a pipe): the rest
        if chunk == b"fmt ":
            fmt = body
        elif chunk == b"data":
            frames = body
        at += 8 + size + (size & 1)
    if fmt is None or len(fmt) < 16:
        raise WavError(f"{name}: the WAV file has no format chunk; {CONVERT}")
    tag, channels, rate = struct.unpack_from("<HHI", fmt)
    bits = struct.unpack_from("<H", fmt, 14)[0]
    if tag == 0xFFFE and len(fmt) >= 26:  # extensible: the sub-format GUID starts with the format tag
        tag = struct.unpack_from("<H", fmt, 24)[0]
    if tag != 1:
        kind = _FORMATS.get(tag, f"format {tag}")
        raise WavError(f"{name}: {kind} audio, not PCM; {CONVERT}")
    if not channels or not rate or bits not in (8, 16, 24, 32):
        raise WavError(f"{name}: {bits}-bit, {channels}-channel, {rate} Hz is not PCM this reads; {CONVERT}")
    return bits // 8, channels, rate, frames or b""


def resample_pcm16(pcm: bytes, rate: int, to: int) -> bytes:
    """16-bit mono little-endian PCM at `rate`, as the same at `to`."""
    return _to_bytes(resample(_to_int16(pcm[: len(pcm) // 2 * 2], 2), rate, to))


def _to_bytes(samples: array.array[int]) -> bytes:
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()
