"""The sans-I/O USP module, on what the official SDK actually sent (a capture in tests/data/)."""

from __future__ import annotations

import ast
import datetime
import functools
import itertools
import re
from pathlib import Path

import pytest

from speechgate.relay import usp

# The lines of a capture of the Speech SDK on the wire that these tests read.
TRANSCRIPT = Path(__file__).parent / "data" / "usp_capture.txt"
SDK_PATHS = {"speech.config", "speech.context", "synthesis.context", "ssml", "telemetry"}


@pytest.fixture(scope="module")
def transcript() -> str:
    return TRANSCRIPT.read_text(encoding="utf-8")


def test_every_text_message_the_sdk_sent_parses(transcript: str) -> None:
    heads = [ast.literal_eval(m) for m in re.findall(r"raw_head=('.*?'|\".*?\")$", transcript, re.M)]
    assert len(heads) >= 20
    for head in heads:
        headers_only = head.split("\r\n\r\n", 1)[0] + "\r\n\r\n"  # some captures run into the body
        message = usp.parse_text(headers_only + '{"k": 1}')
        assert message.path in SDK_PATHS
        assert message.header("x-timestamp")  # any case
        assert message.json() == {"k": 1}
        if message.path in ("speech.context", "synthesis.context", "ssml"):
            assert re.fullmatch(r"[0-9a-f]{32}", message.request_id)


def test_every_binary_frame_header_the_sdk_sent_parses_and_meters(transcript: str) -> None:
    pattern = r"total=(\d+) hdrlen=(\d+) payload=(\d+) cum_payload=\d+\n\s+raw\[:2\+hdrlen\]=(b'.*?')$"
    frames = re.findall(pattern, transcript, re.M)
    assert len(frames) >= 10
    for total, hdrlen, payload, raw in frames:
        head = ast.literal_eval(raw)
        assert len(head) == 2 + int(hdrlen)
        frame = head + b"\0" * int(payload)
        assert len(frame) == int(total)
        message = usp.parse_binary(frame)
        assert message.path == "audio"
        assert audio_bytes_and_header(frame, ())[0] == int(payload) == len(message.body)


def test_encoded_messages_round_trip() -> None:
    text = usp.encode_text("speech.phrase", "ab" * 16, {"DisplayText": "hi", "Offset": 10_000_000})
    assert "\r\n\r\n" in text
    assert "\n" not in text.replace("\r\n", "")  # CRLF only: the SDK ignores LF-only messages
    parsed = usp.parse_text(text)
    assert (parsed.path, parsed.request_id, parsed.json()["DisplayText"]) == (
        "speech.phrase",
        "ab" * 16,
        "hi",
    )
    frame = usp.encode_binary("audio", "cd" * 16, b"\1\2\3", "audio/x-wav", extra={"X-StreamId": "1"})
    message = usp.parse_binary(frame)
    assert (message.path, message.request_id, message.body, message.header("x-streamid")) == (
        "audio",
        "cd" * 16,
        b"\1\2\3",
        "1",
    )
    assert audio_bytes_and_header(frame, ()) == (3, None)


def test_riff_header_matches_the_sdks_and_gives_the_byte_rate() -> None:
    sdk_header = bytes.fromhex(
        "524946460000000057415645666d74201000000001000100803e0000007d0000020010006461746100000000"
    )
    assert usp.riff_header() == sdk_header
    assert usp.riff_byte_rate(sdk_header) == 32000
    assert usp.riff_byte_rate(b"\0" * 44) is None


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ("Path:turn.start\r\n{}", "blank CRLF line"),
        ("no colon\r\n\r\n{}", "not Name:value"),
        # What two readers would read differently is refused, not chosen between:
        ("Path:speech.config\r\nPath:speech.context\r\n\r\n{}", "Path twice"),
        ("Path:speech.config\r\npath: speech.context\r\n\r\n{}", "path twice"),  # any case
        ("\r\n\r\nPath:speech.context\r\n\r\n{}", "starts with a blank line"),
        ("\r\nPath:speech.context\r\n\r\n{}", "blank line among its headers"),
        ("Path:speech.config\nPath:speech.context\r\n\r\n{}", "control character"),  # a lone LF
        ("Path:speech.config\rPath:speech.context\r\n\r\n{}", "control character"),  # a lone CR
        (" Path:speech.context\r\n\r\n{}", "not Name:value"),  # a name with blanks around it
        ("Path :speech.context\r\n\r\n{}", "not Name:value"),
        ("X-RequestId:1\r\n\r\n{}", "without a Path"),
        ("Pa\x00th:speech.context\r\n\r\n{}", "not Name:value"),
    ],
)
def test_malformed_text_is_a_protocol_error(data: str, words: str) -> None:
    with pytest.raises(usp.ProtocolError, match=words):
        usp.parse_text(data)


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (b"\x00", "shorter"),
        (b"\x00\x10Path:audio", "runs past"),
        (b"\x00\x02\xff\xfe", "not ASCII"),
        (b"\x00\x17Path:audio\r\nPath:ssml\r\n", "Path twice"),
        (b"\x00\x0fX-RequestId:1\r\n", "without a Path"),
    ],
)
def test_malformed_binary_is_a_protocol_error(frame: bytes, words: str) -> None:
    with pytest.raises(usp.ProtocolError, match=words):
        usp.parse_binary(frame)


@pytest.mark.parametrize(
    ("head", "path"),
    [
        (b"Path:speech.context\r\nX-RequestId:1\r\n\r\n{}", b"speech.context"),
        (b"Path: speech.context\r\n\r\n{}", b"speech.context"),  # the JavaScript SDK's spelling
        (b"X-RequestId:1\r\npath :\tturn.end \r\n\r\n{}", b"turn.end"),
        (b"X-RequestId:1\r\nPATH:turn.end\r\n\r\n", b"turn.end"),
        (b"X-RequestId:1\r\n\r\nPath:turn.end\r\n", b""),  # in the body: not a header
        (b"X-Path:turn.end\r\n\r\n", b""),
    ],
)
def test_the_path_header_is_found_by_the_header_rules(head: bytes, path: bytes) -> None:
    assert usp.peek_path(head) == path
    assert usp.peek_path(bytearray(head)) == path


def read(piece: bytes, at: int, count: int) -> bytes:
    return piece[at : at + count]


def audio_bytes_and_header(message: bytes, cuts: tuple[int, ...]) -> tuple[int, bytes | None]:
    """What one AudioReading reads of `message` delivered in pieces cut at `cuts`."""
    reading, audio, header = usp.AudioReading(), 0, None
    bounds = (0, *cuts, len(message))
    for start, end in itertools.pairwise(bounds):
        piece = message[start:end]
        more, found = reading.feed(len(piece), functools.partial(read, piece))
        audio, header = audio + more, header or found
    more, short = reading.end()
    return audio + more, header or short


@pytest.mark.parametrize(
    ("payload", "audio", "header"),
    [
        (usp.riff_header() + b"\1" * 3200, 3200, usp.riff_header()),
        (b"\1" * 3200, 3200, None),
        (b"", 0, None),  # end of audio: headers only
        (b"RIF", 3, None),  # starts like a WAV header, but is not one
        (b"RIFFxxxx", 0, b"RIFFxxxx"),  # too short a WAV header: the caller refuses it
    ],
    ids=["wav-header", "audio", "empty", "riff-prefix", "short-header"],
)
def test_an_audio_message_reads_the_same_however_it_is_split(
    payload: bytes, audio: int, header: bytes | None
) -> None:
    """The one reading both data paths meter by: every split in two, and in three at every
    pair of points around the USP header and the WAV header, reads the same."""
    message = usp.encode_binary("audio", "ab" * 16, payload, extra={"X-StreamId": "1"})
    head_end = 2 + int.from_bytes(message[:2], "big")
    splits: list[tuple[int, ...]] = [(cut,) for cut in range(len(message) + 1)]
    near = range(max(0, head_end - 3), min(len(message), head_end + 50) + 1)
    splits += [(a, b) for a in [0, 1, 2, head_end - 1, *near] for b in near if a <= b]
    for cuts in splits:
        assert audio_bytes_and_header(message, cuts) == (audio, header), cuts


@pytest.mark.parametrize(
    ("message", "words"),
    [(b"\x00", "shorter"), (b"\x00\x10Path:audio", "runs past")],
)
def test_an_audio_message_that_is_not_usp_is_refused_however_it_is_split(message: bytes, words: str) -> None:
    for cut in range(len(message) + 1):
        with pytest.raises(usp.ProtocolError, match=words):
            audio_bytes_and_header(message, (cut,))


def test_the_timestamp_is_utc_now_to_the_millisecond() -> None:
    before = datetime.datetime.now(datetime.UTC)
    stamp = usp.timestamp()
    after = datetime.datetime.now(datetime.UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)
    assert before - datetime.timedelta(milliseconds=1) <= when <= after
