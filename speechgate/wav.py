"""Reading a WAV file as what Azure Speech and the plain front door take: 16 kHz, 16-bit, mono PCM.

Other PCM WAVs (8/16/24/32-bit, any rate, any channel count) are converted: channels averaged,
then resampled by linear interpolation, which is plenty for speech recognition.
"""

from __future__ import annotations

import array
import sys
import wave
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


def read_pcm16k(path: Path) -> bytes:
    """The file's audio as 16 kHz 16-bit mono little-endian PCM."""
    try:
        with wave.open(str(path), "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except FileNotFoundError:
        raise WavError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise WavError(f"{path}: is a directory, not a WAV file") from None
    except (wave.Error, EOFError) as exc:
        raise WavError(
            f"{path}: not a PCM WAV file ({exc}); convert it, e.g. with "
            "`ffmpeg -i IN -ar 16000 -ac 1 -c:a pcm_s16le OUT.wav`"
        ) from None
    if not frames:
        raise WavError(f"{path}: the file holds no audio")
    return _to_bytes(resample(_mono(_to_int16(frames, width), channels), rate))


def resample_pcm16(pcm: bytes, rate: int, to: int) -> bytes:
    """16-bit mono little-endian PCM at `rate`, as the same at `to`."""
    return _to_bytes(resample(_to_int16(pcm[: len(pcm) // 2 * 2], 2), rate, to))


def _to_bytes(samples: array.array[int]) -> bytes:
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()
