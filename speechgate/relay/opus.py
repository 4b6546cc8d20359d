"""Opus from phones and browsers, decoded to what the plain door sends Azure: 16 kHz 16-bit mono PCM.

`Transcoder(kind)` takes a stream's bytes as they arrive (`feed`), reads its container
(containers.py: Ogg or WebM), and decodes its Opus packets with FFmpeg's decoder through PyAV (its
wheels carry FFmpeg and libopus: nothing to install or compile). Opus always decodes at 48 kHz;
FFmpeg's resampler takes it to 16 kHz mono. FFmpeg's decoder drops the encoder's pre-skip (its
start-up samples, RFC 7845 §4.2) itself, as the header says: offsets in results are on the audio's
own time line (tests/test_opus.py measures it: no shift).

Decoding costs about 2.4 ms of CPU per audio second (docs/benchmarks.md), done outside the event
loop by the caller (doors/plain.py runs `feed` in a worker thread; PyAV lets go of the GIL while
FFmpeg decodes).
"""

from __future__ import annotations

from typing import Any

import av
from av.audio.resampler import AudioResampler

from speechgate.relay.containers import ContainerError, OggReader, WebmReader

FORMATS = ("ogg-opus", "webm-opus")
OUTPUT_RATE = 16000


def check_opus_head(packet: bytes) -> None:
    """That `packet` is an `OpusHead` (RFC 7845 §5.1) FFmpeg can read, or what is wrong with it."""
    if len(packet) < 19 or packet[:8] != b"OpusHead":
        raise ContainerError("the stream does not begin with an Opus header (OpusHead): is it Opus?")
    version, channels = packet[8], packet[9]
    if version >> 4 != 0 or channels == 0:
        raise ContainerError(f"an OpusHead of version {version} with {channels} channels cannot be read")


class Transcoder:
    def __init__(self, kind: str) -> None:
        assert kind in FORMATS
        self.kind = kind
        self._ogg = OggReader() if kind == "ogg-opus" else None
        self._webm = WebmReader() if kind == "webm-opus" else None
        self._decoder: av.AudioCodecContext | None = None
        self._resampler = AudioResampler(format="s16", layout="mono", rate=OUTPUT_RATE)
        self._headers_seen = 0
        self.packets = 0

    def feed(self, data: bytes) -> bytes:
        """The PCM that `data` completes (often nothing until a page or block is whole)."""
        if self._ogg is not None:
            packets = self._ogg.feed(data)
        else:
            assert self._webm is not None
            packets = self._webm.feed(data)
            if self._decoder is None and self._webm.codec_private is not None:
                self._open(self._webm.codec_private)
        decoded: list[av.AudioFrame] = []
        for packet in packets:
            if self._ogg is not None and self._headers_seen < 2:  # OpusHead, then OpusTags
                if self._headers_seen == 0:
                    self._open(packet)
                elif packet[:8] != b"OpusTags":
                    raise ContainerError("the Opus header is not followed by its tags (OpusTags)")
                self._headers_seen += 1
                continue
            if self._decoder is None:
                raise ContainerError("Opus audio before its header (OpusHead)")
            decoded += self._decode(packet)
        return self._resample(decoded)

    def _open(self, head: bytes) -> None:
        check_opus_head(head)  # here, where the message can say what is wrong
        decoder = av.CodecContext.create("opus", "r")
        assert isinstance(decoder, av.AudioCodecContext)
        decoder.extradata = head
        decoder.open()
        self._decoder = decoder

    def _decode(self, packet: bytes) -> list[av.AudioFrame]:
        assert self._decoder is not None
        self.packets += 1
        try:
            return self._decoder.decode(_padded(packet))
        except av.FFmpegError as exc:
            raise ContainerError(f"Opus packet {self.packets} cannot be decoded ({exc.strerror})") from None

    def _resample(self, frames: list[av.AudioFrame]) -> bytes:
        """To 16 kHz mono s16, in one call for the chunk's frames where they are mono (the
        resampler's per-call cost was half of decoding's, at one call per 20-ms frame)."""
        if not frames:
            return b""
        if all(f.format.name in ("fltp", "flt") and len(f.layout.channels) == 1 for f in frames):
            samples = b"".join(bytes(f.planes[0])[: f.samples * 4] for f in frames)
            whole = av.AudioFrame(format="flt", layout="mono", samples=len(samples) // 4)
            whole.planes[0].update(samples)
            whole.sample_rate = frames[0].sample_rate
            frames = [whole]
        out = bytearray()
        for frame in frames:
            for pcm in self._resampler.resample(frame):
                out += bytes(pcm.planes[0])[: pcm.samples * 2]
        return bytes(out)


def _padded(data: bytes) -> av.Packet[Any]:
    """A packet in FFmpeg's own memory, followed by the zeroed padding its decoders may read past
    the end into. `av.Packet(bytes)` points at the bytes object as it lies in memory, and what
    happened to follow it there changed the decoded audio (tests/test_opus.py would see it)."""
    packet = av.Packet(len(data))
    memoryview(packet)[:] = data
    return packet
