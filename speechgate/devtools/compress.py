"""Compressed audio for `speechgate stream --opus` and the benchmarks: 16 kHz PCM encoded to
Ogg/Opus (as a phone's encoder writes it), and an Opus file read as the relay reads it."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import av

from speechgate.relay.containers import ContainerError
from speechgate.relay.opus import Transcoder, native

PCM_RATE = 16000
OPUS_BITRATE = 24_000  # speech at 16-24 kbit/s loses nothing a recognizer notices
SUFFIXES = {".opus": "ogg-opus", ".ogg": "ogg-opus", ".oga": "ogg-opus", ".webm": "webm-opus"}


@dataclass(frozen=True)
class Encoder:
    """How an app's Opus encoder is set up."""

    rate: int  # the rate it encodes at: 16 kHz keeps it to SILK's wideband, 48 kHz lets it use CELT
    frame_ms: int  # of a packet
    application: str  # libopus' tuning: "voip" or "audio"


# A phone's speech encoder (Android's and iOS' Opus at 16 kHz, `speechgate stream --opus`): the
# cheapest for the relay to decode. Chromium's MediaRecorder, as measured from the demo page: 48 kHz
# whatever the page's AudioContext runs at, 60-ms packets of three 20-ms hybrid or CELT frames.
PHONE = Encoder(PCM_RATE, 20, "voip")
BROWSER = Encoder(48000, 60, "audio")


def encode_opus(
    pcm: bytes, container: str = "ogg", bitrate: int = OPUS_BITRATE, encoder: Encoder = PHONE
) -> bytes:
    """16 kHz 16-bit mono PCM as Opus in `container` ("ogg" or "webm"), one packet an Ogg page."""
    out = io.BytesIO()
    # One Ogg page per packet, as a streaming encoder flushes them: FFmpeg's default holds a second
    # of audio per page, which a reader cannot decode before the page is whole.
    options = {"page_duration": str(encoder.frame_ms * 1000)} if container == "ogg" else {}
    with av.open(out, "w", format=container, options=options) as muxer:
        stream = muxer.add_stream("libopus", rate=encoder.rate)
        assert isinstance(stream, av.AudioStream)
        stream.bit_rate = bitrate
        stream.layout = "mono"
        stream.codec_context.options = {
            "frame_duration": str(encoder.frame_ms),
            "application": encoder.application,
        }
        frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
        frame.planes[0].update(pcm[: len(pcm) // 2 * 2])
        frame.sample_rate = PCM_RATE
        for packet in stream.encode(frame):
            muxer.mux(packet)
        for packet in stream.encode(None):
            muxer.mux(packet)
    return out.getvalue()


def read_opus(path: Path) -> tuple[bytes, str, float]:
    """An Opus file as it is sent: (bytes, the plain door's format, seconds of audio it holds);
    a ValueError says what is wrong with it."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path.name}: not .opus, .ogg or .webm")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    try:
        pcm = Transcoder(kind, native()).feed(data)
    except ContainerError as exc:
        raise ValueError(f"{path.name}: {exc}") from None
    if not pcm:
        raise ValueError(f"{path.name}: no Opus audio in it")
    return data, kind, len(pcm) / (2 * PCM_RATE)
