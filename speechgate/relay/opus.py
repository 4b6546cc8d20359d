"""Opus from phones and browsers, decoded to what the plain door sends Azure: 16 kHz 16-bit mono PCM.

`Transcoder(kind, library)` takes a stream's bytes as they arrive, reads its container (containers.py: Ogg
or WebM) into Opus packets (`read`, cheap), and decodes them (`decode`); `feed` does both.

Two engines decode, chosen from the stream's header (`OpusHead`, RFC 7845 §5.1):

- libopus through ctypes (libopus.py), straight to 16 kHz mono: the usual case, where libopus is
  found and the stream is mono or stereo (mapping family 0) with no output gain.
- FFmpeg's decoder through PyAV, at 48 kHz, then FFmpeg's resampler to 16 kHz mono: the rest
  (multichannel streams, a header with gain), and everywhere libopus is not found.

Both drop the encoder's pre-skip (its start-up samples, RFC 7845 §4.2), so offsets in results are
on the audio's own time line (tests/test_opus.py measures it for both: no shift), and both give
the same audio within the codec's own rounding.

Decoding costs 0.9 to 1.2 ms of CPU per audio second with libopus and 1.5 to 2.2 times that with
FFmpeg (docs/benchmarks.md). The plain door decodes a chunk of up to `INLINE_MS` of audio on the
event loop (well under a millisecond) and a larger one in a worker thread; both libraries let go
of the GIL while they decode.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

import av
from av.audio.resampler import AudioResampler

from speechgate.relay import libopus
from speechgate.relay.containers import ContainerError, OggReader, WebmReader

FORMATS = ("ogg-opus", "webm-opus")
OUTPUT_RATE = 16000
# The most the plain door reads and decodes on the event loop at once (about a millisecond's work):
INLINE_BYTES = 16 * 1024  # of container, read in Python (more than 4 s of speech at 24 kbit/s)
INLINE_MS = 1000  # of audio, decoded
_OPUS_HEAD = struct.Struct("<8sBBHIhB")  # magic, version, channels, pre-skip, input rate, gain, family


@functools.cache
def native() -> libopus.Library | None:
    """libopus, looked for once per process."""
    return libopus.load()


def check_opus_head(packet: bytes) -> tuple[int, int, int, int]:
    """(channels, pre-skip at 48 kHz, output gain, mapping family) of an `OpusHead`, or a
    ContainerError saying what is wrong with it."""
    if len(packet) < 19 or packet[:8] != b"OpusHead":
        raise ContainerError("the stream does not begin with an Opus header (OpusHead): is it Opus?")
    _, version, channels, pre_skip, _, gain, family = _OPUS_HEAD.unpack_from(packet)
    if version >> 4 != 0 or channels == 0:
        raise ContainerError(f"an OpusHead of version {version} with {channels} channels cannot be read")
    return channels, pre_skip, gain, family


def packet_ms(packet: bytes) -> float:
    """The audio an Opus packet holds, from its table-of-contents byte (RFC 6716 §3.1): 0 for a
    packet too short to say (the decoder will refuse it)."""
    if not packet:
        return 0.0
    config, code = packet[0] >> 3, packet[0] & 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        frame = (10.0, 20.0, 40.0, 60.0)[config & 3]
    elif config < 16:  # hybrid: 10, 20 ms
        frame = (10.0, 20.0)[config & 1]
    else:  # CELT: 2.5, 5, 10, 20 ms
        frame = (2.5, 5.0, 10.0, 20.0)[config & 3]
    if code == 0:
        return frame
    total = 2 * frame if code in (1, 2) else frame * (packet[1] & 0x3F) if len(packet) > 1 else 0.0
    return total if total <= 120 else 0.0  # longer than a packet may be: invalid


class _Libopus:
    def __init__(self, library: libopus.Library, pre_skip: int) -> None:
        self._decoder = library.decoder(OUTPUT_RATE, 1)  # a mono decoder mixes stereo down itself
        self._skip = pre_skip * OUTPUT_RATE // 48000 * 2  # bytes of start-up audio still to drop

    def decode(self, packets: list[bytes], first: int) -> bytes:
        try:
            out = self._decoder.decode(packets)
        except libopus.OpusError as exc:
            raise ContainerError(f"Opus packet {first + exc.index} cannot be decoded ({exc})") from None
        if self._skip:
            dropped = min(self._skip, len(out))
            self._skip -= dropped
            out = out[dropped:]
        return out


class _Ffmpeg:
    """FFmpeg's decoder drops the pre-skip itself, as the header it is given says."""

    def __init__(self, head: bytes) -> None:
        decoder = av.CodecContext.create("opus", "r")
        assert isinstance(decoder, av.AudioCodecContext)
        decoder.extradata = head
        decoder.open()
        self._decoder = decoder
        self._resampler = AudioResampler(format="s16", layout="mono", rate=OUTPUT_RATE)

    def decode(self, packets: list[bytes], first: int) -> bytes:
        frames: list[av.AudioFrame] = []
        for number, packet in enumerate(packets, first):
            try:
                frames += self._decoder.decode(_padded(packet))
            except av.FFmpegError as exc:
                raise ContainerError(f"Opus packet {number} cannot be decoded ({exc.strerror})") from None
        return self._resample(frames)

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


class Transcoder:
    def __init__(self, kind: str, library: libopus.Library | None) -> None:
        """`library`: the libopus to decode with (`native()`), or None for FFmpeg only."""
        assert kind in FORMATS
        self.kind = kind
        self._library = library
        self._ogg = OggReader() if kind == "ogg-opus" else None
        self._webm = WebmReader() if kind == "webm-opus" else None
        self._engine: _Libopus | _Ffmpeg | None = None
        self._headers_seen = 0
        self.packets = 0

    @property
    def engine(self) -> str | None:
        """Which decoder this stream got ("libopus" or "ffmpeg"), once its header has come."""
        if self._engine is None:
            return None
        return "libopus" if isinstance(self._engine, _Libopus) else "ffmpeg"

    def feed(self, data: bytes) -> bytes:
        """The PCM that `data` completes (often nothing until a page or block is whole)."""
        return self.decode(self.read(data))

    def read(self, data: bytes) -> list[bytes]:
        """The Opus audio packets `data` completes, its headers taken in on the way."""
        if self._ogg is not None:
            packets = self._ogg.feed(data)
        else:
            assert self._webm is not None
            packets = self._webm.feed(data)
            if self._engine is None and self._webm.codec_private is not None:
                self._open(self._webm.codec_private)
        audio: list[bytes] = []
        for packet in packets:
            if self._ogg is not None and self._headers_seen < 2:  # OpusHead, then OpusTags
                if self._headers_seen == 0:
                    self._open(packet)
                elif packet[:8] != b"OpusTags":
                    raise ContainerError("the Opus header is not followed by its tags (OpusTags)")
                self._headers_seen += 1
                continue
            if self._engine is None:
                raise ContainerError("Opus audio before its header (OpusHead)")
            if packet:  # an empty packet holds no audio (and would tell FFmpeg the stream ended)
                audio.append(packet)
        return audio

    def decode(self, packets: list[bytes]) -> bytes:
        """16 kHz mono PCM of `packets` (from `read`, in order)."""
        if not packets:
            return b""
        assert self._engine is not None
        first = self.packets + 1
        self.packets += len(packets)
        return self._engine.decode(packets, first)

    def _open(self, head: bytes) -> None:
        _, pre_skip, gain, family = check_opus_head(head)  # here, where the message can say what is wrong
        if self._library is not None and family == 0 and gain == 0:
            self._engine = _Libopus(self._library, pre_skip)
        else:
            self._engine = _Ffmpeg(head)


def _padded(data: bytes) -> av.Packet[Any]:
    """A packet in FFmpeg's own memory, followed by the zeroed padding its decoders may read past
    the end into. `av.Packet(bytes)` points at the bytes object as it lies in memory, and what
    happened to follow it there changed the decoded audio (tests/test_opus.py would see it)."""
    packet = av.Packet(len(data))
    memoryview(packet)[:] = data
    return packet
