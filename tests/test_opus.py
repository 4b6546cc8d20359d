"""Opus on the plain door: the containers read without I/O at any byte boundary, decoding to the
16 kHz PCM Azure gets, and `speechgate dev` recognizing Ogg/Opus and WebM/Opus as it does PCM."""

from __future__ import annotations

import array
import asyncio
import contextlib
import io
import json
import random
from pathlib import Path
from typing import Any

import av
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from speechgate.devtools.compress import encode_opus
from speechgate.devtools.wav import read_pcm16k
from speechgate.relay.containers import ContainerError, OggReader, WebmReader, crc, ogg_pages
from speechgate.relay.opus import Transcoder
from tests.support.dev import Dev, token

SPEECH_WAV = Path(__file__).parent / "data" / "speech.wav"  # espeak-ng: two sentences, 1 s apart


@pytest.fixture(scope="module")
def pcm() -> bytes:
    return read_pcm16k(SPEECH_WAV)


@pytest.fixture(scope="module")
def ogg(pcm: bytes) -> bytes:
    return encode_opus(pcm, "ogg")


@pytest.fixture(scope="module")
def webm(pcm: bytes) -> bytes:
    return encode_opus(pcm, "webm")


def pieces(data: bytes, seed: int, largest: int = 700) -> list[bytes]:
    """`data` cut at random places, as a recorder's chunks fall."""
    rnd, out, at = random.Random(seed), [], 0
    while at < len(data):
        size = rnd.randint(1, largest)
        out.append(data[at : at + size])
        at += size
    return out


# --- the containers, without I/O ---------------------------------------------------------------


def test_ogg_crc_is_the_formats_own() -> None:
    """RFC 3533's CRC-32 (unreflected 0x04C11DB7, from 0): the check value of the CRC catalogue's
    CRC-32/MPEG-2 differs only in its initial value, so test the polynomial on one byte."""
    assert crc(b"\x01") == 0x04C11DB7
    assert crc(b"") == 0


@pytest.mark.parametrize("kind", ["ogg", "webm"])
def test_packets_are_the_same_wherever_the_bytes_are_cut(kind: str, ogg: bytes, webm: bytes) -> None:
    data = ogg if kind == "ogg" else webm
    whole = (OggReader() if kind == "ogg" else WebmReader()).feed(data)
    assert len(whole) > 200  # 4.8 s of 20-ms frames (and Ogg's two header packets)
    for seed in range(30):
        reader = OggReader() if kind == "ogg" else WebmReader()
        assert [p for piece in pieces(data, seed) for p in reader.feed(piece)] == whole
    byte_by_byte = OggReader() if kind == "ogg" else WebmReader()
    assert [p for i in range(len(data)) for p in byte_by_byte.feed(data[i : i + 1])] == whole


def test_a_damaged_ogg_page_is_named(ogg: bytes) -> None:
    damaged = bytearray(ogg)
    damaged[len(ogg) // 2] ^= 0x40  # one bit, inside some page
    with pytest.raises(ContainerError, match=r"Ogg page \d+ is damaged \(its checksum does not match\)"):
        OggReader().feed(bytes(damaged))


@pytest.mark.parametrize(
    ("reader", "data", "words"),
    [
        (OggReader, b"\x1a\x45\xdf\xa3" + bytes(60), "not an Ogg page where one should start"),
        (WebmReader, b"OggS" + bytes(60), "not WebM: it does not start with an EBML header"),
        (OggReader, b"RIFF" + bytes(60), "is this Ogg/Opus?"),
    ],
)
def test_the_wrong_container_says_what_it_expected(reader: Any, data: bytes, words: str) -> None:
    with pytest.raises(ContainerError, match=words.replace("?", r"\?").replace("(", r"\(")):
        reader().feed(data)


def test_a_webm_of_another_codec_is_refused_by_name() -> None:
    out = io.BytesIO()
    with av.open(out, "w", format="webm") as muxer:  # FFmpeg's own Vorbis encoder: stereo only
        stream = muxer.add_stream("vorbis", rate=16000, options={"strict": "experimental"})
        assert isinstance(stream, av.AudioStream)
        stream.layout = "stereo"
        frame = av.AudioFrame(format="s16", layout="stereo", samples=16000)
        frame.planes[0].update(bytes(64000))
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            muxer.mux(packet)
    with pytest.raises(ContainerError, match="the WebM audio is A_VORBIS, not Opus"):
        WebmReader().feed(out.getvalue())


# --- decoding ------------------------------------------------------------------------------------


def decode(kind: str, chunks: list[bytes]) -> bytes:
    transcoder = Transcoder(kind)
    return b"".join(transcoder.feed(chunk) for chunk in chunks)


def lag(a: bytes, b: bytes, most: int = 80) -> int:
    """The shift of `b` against `a` (in samples) that lines them up best."""
    x, y = array.array("h", a), array.array("h", b)
    n = min(len(x), len(y)) - most
    return max(range(-most, most + 1), key=lambda k: sum(x[i] * y[i + k] for i in range(most, n, 5)))


@pytest.mark.parametrize("kind", ["ogg-opus", "webm-opus"])
def test_decoded_audio_is_the_recording_on_its_own_time_line(
    kind: str, pcm: bytes, ogg: bytes, webm: bytes
) -> None:
    """The encoder's pre-skip is dropped, once: results' offsets are where the words are."""
    data = ogg if kind == "ogg-opus" else webm
    decoded = decode(kind, pieces(data, 7))
    assert abs(len(decoded) - len(pcm)) <= 640  # within one 20-ms frame
    assert lag(pcm, decoded) == 0  # at 16 kHz, over ±5 ms
    # The same wherever the bytes were cut: with packets that lacked FFmpeg's zeroed padding, the
    # decoder read whatever followed them in memory, and 230 ms of one cut differed (opus._padded).
    for seed in range(8, 14):
        assert decode(kind, pieces(data, seed)) == decoded


def test_a_truncated_stream_gives_what_it_holds(ogg: bytes) -> None:
    half = Transcoder("ogg-opus").feed(ogg[: len(ogg) // 2 + 17])  # ends inside a page
    assert 0 < len(half) < len(Transcoder("ogg-opus").feed(ogg))


def test_opus_audio_without_its_header_is_refused(ogg: bytes) -> None:
    assert OggReader().feed(ogg)[0][:8] == b"OpusHead"
    with pytest.raises(ContainerError, match=r"does not begin with an Opus header \(OpusHead\)"):
        Transcoder("ogg-opus").feed(b"".join(ogg_pages(ogg)[1:]))  # the tags, then audio


# --- through the relay, recognized offline ---------------------------------------------------------


async def listen(dev: Dev, query: str, chunks: list[bytes]) -> tuple[list[dict[str, Any]], int | None, str]:
    url = f"{dev.relay_url}/v1/listen?language=en-US&{query}"
    events: list[dict[str, Any]] = []
    async with connect(url, additional_headers={"Authorization": f"Bearer {token(dev)}"}) as ws:

        async def send() -> None:
            for chunk in chunks:
                await ws.send(chunk)
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send())
        with contextlib.suppress(ConnectionClosed):  # a close other than 1000 raises here
            async for message in ws:
                events.append(json.loads(message))
        with contextlib.suppress(ConnectionClosed):  # the relay may close before all is sent
            await sender
        return events, ws.close_code, ws.close_reason or ""


def finals(events: list[dict[str, Any]]) -> list[str]:
    return [e["text"] for e in events if e["type"] == "final"]


@pytest.mark.parametrize("kind", ["ogg-opus", "webm-opus"])
def test_opus_is_recognized_as_its_decoded_pcm_is(
    offline_dev: Dev, kind: str, pcm: bytes, ogg: bytes, webm: bytes
) -> None:
    """Through the relay, Opus in chunks cut at random byte offsets gives exactly what the same
    audio decoded here and sent as PCM gives: the relay adds nothing and loses nothing. Against
    the original PCM, the codec's loss shows in PocketSphinx's words (it is that sensitive), not
    in how many utterances it finds or where they start."""
    data = ogg if kind == "ogg-opus" else webm
    heard, code, reason = asyncio.run(listen(offline_dev, f"format={kind}", pieces(data, 3, 2000)))
    assert (code, reason) == (1000, "done")
    decoded = decode(kind, [data])
    as_pcm, _, _ = asyncio.run(listen(offline_dev, "format=pcm", list(pieces(decoded, 4, 6400))))
    assert finals(heard) == finals(as_pcm)
    assert starts(heard) == starts(as_pcm)
    original, _, _ = asyncio.run(listen(offline_dev, "format=pcm", list(pieces(pcm, 4, 6400))))
    assert len(finals(heard)) == len(finals(original)) == 2
    assert all(abs(a - b) <= 40 for a, b in zip(starts(heard), starts(original), strict=True))


def starts(events: list[dict[str, Any]]) -> list[int]:
    return [e["offset_ms"] for e in events if e["type"] == "final"]


def test_a_truncated_opus_stream_ends_with_what_it_held(offline_dev: Dev, ogg: bytes) -> None:
    events, code, _ = asyncio.run(listen(offline_dev, "format=ogg-opus", [ogg[: len(ogg) * 2 // 3 + 5]]))
    assert code == 1000
    assert len(finals(events)) >= 1


@pytest.mark.parametrize(
    ("query", "data", "words"),
    [
        ("format=ogg-opus", "damaged", "format=ogg-opus: Ogg page"),
        ("format=ogg-opus", "webm", "format=ogg-opus: not an Ogg page where one should start"),
        ("format=webm-opus", "ogg", "format=webm-opus: not WebM"),
        ("format=pcm", "ogg", "this is ogg-opus audio, not PCM; open the stream with format=ogg-opus"),
        ("", "webm", "this is webm-opus audio, not PCM; open the stream with format=webm-opus"),
    ],
)
def test_audio_that_is_not_what_the_stream_said_is_refused_with_1007(
    offline_dev: Dev, query: str, data: str, words: str, ogg: bytes, webm: bytes
) -> None:
    payload = {"ogg": ogg, "webm": webm, "damaged": ogg[:3000] + bytes([ogg[3000] ^ 1]) + ogg[3001:]}[data]
    events, code, reason = asyncio.run(listen(offline_dev, query, [payload]))
    assert code == 1007
    assert words in reason
    assert finals(events) == []  # nothing of it reached the recognizer as audio


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("format=mp3", "format mp3 is not supported here; send format=pcm"),
        ("format=ogg-opus&sample_rate=48000", "format=ogg-opus carries its own rate; send no sample_rate"),
    ],
)
def test_an_unknown_format_is_refused_at_the_handshake(offline_dev: Dev, query: str, words: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(listen(offline_dev, query, []))
    assert refused.value.response.status_code == 400
    assert words in json.loads(refused.value.response.body or b"{}")["message"]


def test_stream_opus_says_what_it_saved(offline_dev: Dev, tmp_path: Path, webm: bytes) -> None:
    sent = offline_dev.stream(str(SPEECH_WAV), "--opus", "--fast", "--json")
    assert sent.returncode == 0, sent.stderr
    summary = json.loads(sent.stdout.splitlines()[-1])
    assert summary["finals"] == 2
    assert summary["pcm_bytes"] >= 8 * summary["bytes_sent"]  # the goal: at most an eighth
    # the same utterances as PCM; their words differ by the codec's loss (PocketSphinx is that sensitive)
    as_pcm = offline_dev.stream(str(SPEECH_WAV), "--fast", "--json")
    assert json.loads(as_pcm.stdout.splitlines()[-1])["finals"] == summary["finals"]
    recorded = tmp_path / "recorded.webm"
    recorded.write_bytes(webm)
    text = offline_dev.stream(str(recorded), "--fast")
    assert text.returncode == 0, text.stderr
    assert "bytes of webm-opus where 16 kHz PCM needs" in text.stderr
    both = offline_dev.stream(str(SPEECH_WAV), "--opus", "--sdk")
    assert both.returncode == 2
    assert "Opus goes to the plain door" in both.stderr
