"""USP, the Azure Speech WebSocket protocol, without I/O: bytes in, messages out, and back.

Text messages: header lines `Name:value` ending in CRLF, a blank CRLF line, then the body.
Binary messages: a 2-byte big-endian header length, ASCII header lines each ending in CRLF (no
blank line), then the payload (audio). docs/relay.md describes the protocol as the SDKs speak it.
On the relay's hot path: `AudioReading` (what an app's audio message holds, however it is
fragmented) and `peek_path` (the Path of Azure's messages); the rest is for the strict reading of
the app's text messages, the plain front door and the fake service.
"""

from __future__ import annotations

import functools
import json
import re
import struct
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

CRLF = "\r\n"
TICKS_PER_MS = 10_000  # offsets and durations are 100-ns ticks
PCM16K_BYTES_PER_S = 32_000  # 16 kHz, 16-bit, mono

# Message paths (the `Path:` header) the relay and its stand-ins read or write. The splice
# compares the raw header bytes, hence the bytes forms.
SPEECH_CONFIG = "speech.config"
SPEECH_CONTEXT = "speech.context"
SYNTHESIS_CONTEXT = "synthesis.context"
SSML = "ssml"
AUDIO = "audio"
RESPONSE = "response"
TURN_START = "turn.start"
TURN_END = "turn.end"
START_DETECTED = "speech.startDetected"
END_DETECTED = "speech.endDetected"
HYPOTHESIS = "speech.hypothesis"
PHRASE = "speech.phrase"
TURN_END_BYTES = TURN_END.encode()
TURN_START_PATHS = (SPEECH_CONTEXT, SYNTHESIS_CONTEXT)  # what the client sends to begin a turn
RESULTS = (HYPOTHESIS.encode(), PHRASE.encode())


class ProtocolError(ValueError):
    """Not a USP message; the message says what is wrong."""


@dataclass(frozen=True)
class Message:
    """One USP message. Header names are kept as sent; `header()` looks them up in any case."""

    headers: dict[str, str]
    body: bytes = b""
    binary: bool = False

    def header(self, name: str, default: str = "") -> str:
        lowered = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lowered:
                return value
        return default

    @property
    def path(self) -> str:
        return self.header("Path")

    @property
    def request_id(self) -> str:
        return self.header("X-RequestId")

    def json(self) -> Any:
        """The body as JSON; a ProtocolError (a ValueError) when it is not, nesting too deep too."""
        try:
            return json.loads(self.body) if self.body else {}
        except RecursionError:
            raise ProtocolError("JSON nested too deeply") from None


def new_request_id() -> str:
    return uuid.uuid4().hex


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))


def timestamp() -> str:
    """The time now as USP's X-Timestamp (UTC, to the millisecond). Once per audio message: the
    second's text is kept, and formatting the rest costs a fifth of strftime's."""
    now_ms = time.time_ns() // 1_000_000
    return f"{_second(now_ms // 1000)}{now_ms % 1000:03d}Z"


# A header name is an HTTP token; a line holds no CR or LF of its own; values are trimmed of the
# blanks around them (the SDKs write `Name:value` and `Name: value`). Anything else is refused,
# not guessed at: the SDKs' own readers (split on any CR or LF, names trimmed, the last of a
# repeated header kept) and ours would read such a message differently, and what the relay checks
# must be what Azure acts on.
_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")


def _parse_headers(block: str, what: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    seen: set[str] = set()
    if not block:
        raise ProtocolError(f"{what} without headers (it starts with a blank line)")
    for line in block.split(CRLF):
        name, sep, value = line.partition(":")
        if not line:
            raise ProtocolError(f"{what} with a blank line among its headers")
        if not sep or not _NAME.fullmatch(name):
            raise ProtocolError(f"{what} with a header line that is not Name:value: {line[:40]!r}")
        if not _VALUE.fullmatch(value):
            raise ProtocolError(f"{what} with a control character (a lone CR or LF?) in header {name[:40]}")
        lowered = name.lower()
        if lowered in seen:
            raise ProtocolError(f"{what} with header {name[:40]} twice")
        seen.add(lowered)
        headers[name] = value.strip(" \t")
    if "path" not in seen:
        raise ProtocolError(f"{what} without a Path header")
    return headers


_PATH_HEADER = re.compile(rb"(?:^|\n)[ \t]*path[ \t]*:[ \t]*([!-~]+)", re.IGNORECASE)


def peek_path(head: bytes | bytearray) -> bytes | bytearray:
    """The `Path` of a text message from its first bytes; b"" if not there. Header names are
    case-insensitive and may have spaces around the colon (the JavaScript SDK writes
    `Path: speech.context`). For the relay's watch on turns and results (run on every text frame
    from Azure, hence the quick look for the usual spelling first), not for security checks,
    which parse the whole message. Read only of Azure's messages: the app's are parsed whole and
    strictly (`parse_text`, `AudioReading`), once, for every rule."""
    at = head.find(b"Path:")
    if at == 0 or (at > 0 and head[at - 1] == 10):  # at a line's start: the usual spelling
        end = head.find(b"\r", at)
        blank = head.find(b"\r\n\r\n")
        if end != -1 and (blank == -1 or at < blank):
            return head[at + 5 : end].strip(b" \t")
    match = _PATH_HEADER.search(head.split(b"\r\n\r\n", 1)[0])
    return match.group(1) if match else b""


def parse_text(text: str) -> Message:
    """A text message, read strictly: one reading for every rule that looks at it."""
    head, sep, body = text.partition(CRLF + CRLF)
    if not sep:
        raise ProtocolError("text message without the blank CRLF line after its headers")
    return Message(_parse_headers(head, "text message"), body.encode("utf-8"))


def encode_text(
    path: str,
    request_id: str | None,
    body: str | Mapping[str, Any],
    content_type: str = "application/json",
    extra: Mapping[str, str] | None = None,
) -> str:
    text = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
    lines = [f"Path:{path}", f"X-Timestamp:{timestamp()}", f"Content-Type:{content_type}"]
    if request_id:
        lines.append(f"X-RequestId:{request_id}")
    lines += [f"{k}:{v}" for k, v in (extra or {}).items()]
    return CRLF.join(lines) + CRLF + CRLF + text


def parse_binary(frame: bytes) -> Message:
    if len(frame) < 2:
        raise ProtocolError("binary message shorter than its 2-byte header length")
    (size,) = struct.unpack_from(">H", frame)
    if 2 + size > len(frame):
        raise ProtocolError(_PAST_ITS_END)
    try:
        head = frame[2 : 2 + size].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("binary message headers are not ASCII") from None
    if head.endswith(CRLF):
        head = head[:-2]  # each line ends in CRLF, the last one too
    return Message(_parse_headers(head, "binary message"), frame[2 + size :], binary=True)


_LENGTH, _PAYLOAD, _READ = 0, 1, 2
_RIFF = b"RIFF"
_PAST_ITS_END = "binary message header length runs past its end"
WAV_HEADER_BYTES = 44


class AudioReading:
    """What the relay reads of one binary message from the app, however its bytes are split: where
    its USP headers end (the 2-byte length), whether its payload starts with a WAV header (a
    turn's first audio), and so how many of its bytes are audio. The one reading of both data
    paths of the Azure door: the message path feeds a whole message, the splice each fragment,
    and only the few bytes wanted are read (`read(at, count)`: the fragment's bytes from `at`,
    unmasked). `end` finishes the message and readies the reading for the next."""

    __slots__ = ("counted", "field", "payload_at", "seen", "state", "wav")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seen = 0  # bytes of the message fed so far
        self.counted = 0  # of them, counted as audio
        self.field = b""  # the bytes being read: the header length, then the payload's start
        self.payload_at = 0
        self.state = _LENGTH
        self.wav = False  # the payload starts with a WAV header: its 44 bytes are no audio

    def feed(self, length: int, read: Callable[[int, int], bytes]) -> tuple[int, bytes | None]:
        """One fragment of `length` bytes: how many more bytes are now known to be audio, and the
        WAV header when it has just been read (to meter by it before those bytes count)."""
        start = self.seen
        end = self.seen = start + length
        if self.state == _READ:  # the usual case: the rest of a message whose start was read
            self.counted += length
            return length, None
        header: bytes | None = None
        while self.state != _READ:
            at = len(self.field) if self.state == _LENGTH else self.payload_at + len(self.field)
            if at >= end:
                return 0, None
            want = 2 if self.state == _LENGTH else 1 if not self.field else 4 if len(self.field) < 4 else 44
            self.field += read(at - start, min(want - len(self.field), end - at))
            if self.state == _LENGTH:
                if len(self.field) == 2:
                    self.payload_at = 2 + int.from_bytes(self.field, "big")
                    self.field, self.state = b"", _PAYLOAD
            elif not _RIFF.startswith(self.field[:4]):
                self.state = _READ  # audio, not a WAV header
            elif len(self.field) == WAV_HEADER_BYTES:
                self.wav, self.state, header = True, _READ, self.field
        audio = end - self.payload_at - (WAV_HEADER_BYTES if self.wav else 0) - self.counted
        self.counted += audio
        return audio, header

    def end(self) -> tuple[int, bytes | None]:
        """The message is complete: the audio bytes not yet counted, and the start of a WAV header
        too short to be one (refused as any bad WAV header is); a ProtocolError when the message is
        not USP's binary message."""
        state, field, seen, payload_at = self.state, self.field, self.seen, self.payload_at
        self.reset()
        if state == _LENGTH:
            raise ProtocolError("binary message shorter than its 2-byte header length")
        if seen < payload_at:
            raise ProtocolError(_PAST_ITS_END)
        if state == _PAYLOAD and len(field) >= 4:
            return 0, field  # RIFF, then the message ended before a whole WAV header
        return (len(field), None) if state == _PAYLOAD else (0, None)

    def whole(
        self, length: int, read: Callable[[int, int], bytes], head: int, first: int
    ) -> tuple[int, bytes | None]:
        """`feed` then `end` for a whole message in one piece, given what the caller reads of it
        cheaply: its USP header length `head` and its payload's first byte `first` (-1: none).
        The splice's usual audio message, with no WAV header, is settled from these alone."""
        if first != 0x52 and self.state == _LENGTH and not self.seen:  # not "R": no WAV header
            if length < 2 + head:
                raise ProtocolError(_PAST_ITS_END)
            return length - 2 - head, None
        audio, header = self.feed(length, read)
        more, short = self.end()
        return audio + more, header or short


def encode_binary(
    path: str,
    request_id: str,
    payload: bytes,
    content_type: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    lines = [f"Path:{path}", f"X-RequestId:{request_id}", f"X-Timestamp:{timestamp()}"]
    if content_type:
        lines.append(f"Content-Type:{content_type}")
    lines += [f"{k}:{v}" for k, v in (extra or {}).items()]
    head = (CRLF.join(lines) + CRLF).encode("ascii")
    return struct.pack(">H", len(head)) + head + payload


def riff_header(sample_rate: int = 16000, bits: int = 16, channels: int = 1) -> bytes:
    """The 44-byte WAV header the SDK sends first, with RIFF and data sizes 0 (a stream)."""
    block = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", 0)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, bits)
        + b"data"
        + struct.pack("<I", 0)
    )


def wav_byte_rate(header: bytes | bytearray) -> int:
    """Bytes per second of the audio after a WAV header, once the header is found to describe audio
    the relay meters correctly (and Azure takes): 16-bit PCM, 8-48 kHz, 1-8 channels, its byte
    rate and block size those of the format. Anything else is a ProtocolError saying what to send:
    the app's own header would otherwise decide how its audio is counted."""
    if len(header) < 44 or header[:4] != b"RIFF" or header[8:12] != b"WAVE" or header[12:16] != b"fmt ":
        raise ProtocolError("audio must start with a WAV header (RIFF, WAVE, then the fmt chunk)")
    tag, channels, rate, byte_rate, block, bits = struct.unpack_from("<HHIIHH", header, 20)
    if tag != 1:
        raise ProtocolError(f"WAV format {tag} is not supported; send 16-bit PCM (format 1)")
    if bits != 16:
        raise ProtocolError(f"{bits}-bit audio is not supported; send 16-bit PCM")
    if not 8000 <= rate <= 48000:
        raise ProtocolError(f"a sample rate of {rate} Hz is not supported; send 8000 to 48000 Hz")
    if not 1 <= channels <= 8:
        raise ProtocolError(f"{channels} channels are not supported; send 1 to 8")
    if byte_rate != rate * channels * 2 or block != channels * 2:
        raise ProtocolError(
            f"the WAV header's byte rate {byte_rate} (block {block}) does not match "
            f"{rate} Hz, {channels} channel(s), 16 bits"
        )
    return int(byte_rate)


def riff_byte_rate(payload: bytes) -> int | None:
    """Bytes per second of a payload that starts with a WAV header, else None."""
    if len(payload) >= 44 and payload[:4] == b"RIFF" and payload[8:12] == b"WAVE":
        return int(struct.unpack_from("<I", payload, 28)[0]) or None
    return None


def continuation_s(message: Message) -> float | None:
    """Where a speech.context's continuation says its audio starts on the session's time line
    (`continuation.audio.streams.1.offset`, ticks; a continuation without one starts at 0, as
    the SDKs send before the first phrase), in seconds; None when it is no continuation."""
    try:
        continuation = message.json()["continuation"]
        offset = continuation.get("audio", {}).get("streams", {}).get("1", {}).get("offset", 0)
        seconds = int(offset) / (TICKS_PER_MS * 1000)
    except (ProtocolError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return seconds if seconds >= 0 else None


def ms(ticks: int | float) -> int:
    return int(ticks) // TICKS_PER_MS
