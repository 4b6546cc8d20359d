"""Opus on the plain door: the containers read without I/O at any byte boundary, decoding to the
16 kHz PCM Azure gets, and `speechgate dev` recognizing Ogg/Opus and WebM/Opus as it does PCM."""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import io
import json
import math
import random
import tracemalloc
from pathlib import Path
from typing import Any

import av
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from speechgate.devtools.compress import BROWSER, PHONE, Encoder, encode_opus
from speechgate.devtools.wav import read_pcm16k
from speechgate.relay import libopus, opus
from speechgate.relay.containers import HEADER, ContainerError, OggReader, WebmReader, crc, ogg_pages
from speechgate.relay.opus import Transcoder
from tests.support.dev import Dev, token

SPEECH_WAV = Path(__file__).parent / "data" / "speech.wav"  # espeak-ng: two sentences, 1 s apart


@pytest.fixture(scope="module")
def pcm() -> bytes:
    return read_pcm16k(SPEECH_WAV)


@pytest.fixture(scope="module")
def ogg(pcm: bytes) -> bytes:
    return encode_opus(pcm, "ogg", encoder=BROWSER)  # the costlier to decode


@pytest.fixture(scope="module")
def webm(pcm: bytes) -> bytes:
    return encode_opus(pcm, "webm", encoder=BROWSER)


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
    assert len(whole) > 75  # 4.8 s of 60-ms packets (and Ogg's two header packets)
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


ENGINES = ["libopus", "ffmpeg"]


def engine_library(engine: str) -> libopus.Library | None:
    return opus.native() if engine == "libopus" else None


def decode(kind: str, chunks: list[bytes], engine: str = "libopus") -> bytes:
    transcoder = Transcoder(kind, engine_library(engine))
    out = b"".join(transcoder.feed(chunk) for chunk in chunks)
    assert transcoder.engine == engine
    return out


def lag(a: bytes, b: bytes, most: int = 80) -> int:
    """The shift of `b` against `a` (in samples) that lines them up best."""
    x, y = array.array("h", a), array.array("h", b)
    n = min(len(x), len(y)) - most
    return max(range(-most, most + 1), key=lambda k: sum(x[i] * y[i + k] for i in range(most, n, 5)))


def snr_db(reference: bytes, other: bytes) -> float:
    x, y = array.array("h", reference), array.array("h", other)
    n = min(len(x), len(y))
    signal = sum(v * v for v in x[:n])
    noise = sum((a - b) ** 2 for a, b in zip(x[:n], y[:n], strict=True)) or 1
    return 10 * math.log10(signal / noise)


def test_libopus_is_found_where_ci_runs() -> None:
    """PyAV's wheels carry libopus; a release that stops carrying it (or moves it) fails here,
    rather than the relay quietly decoding with FFmpeg at up to twice the CPU."""
    library = opus.native()
    assert library is not None
    assert library.version.startswith("libopus ")
    assert "av.libs" in library.path or ".dylibs" in library.path or "opus" in Path(library.path).name


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["ogg-opus", "webm-opus"])
def test_decoded_audio_is_the_recording_on_its_own_time_line(
    kind: str, engine: str, pcm: bytes, ogg: bytes, webm: bytes
) -> None:
    """The encoder's pre-skip is dropped, once: results' offsets are where the words are."""
    data = ogg if kind == "ogg-opus" else webm
    decoded = decode(kind, pieces(data, 7), engine)
    assert abs(len(decoded) - len(pcm)) <= 1920  # within one 60-ms packet
    assert lag(pcm, decoded) == 0  # at 16 kHz, over ±5 ms
    # The same wherever the bytes were cut: with packets that lacked FFmpeg's zeroed padding, the
    # decoder read whatever followed them in memory, and 230 ms of one cut differed (opus._padded).
    for seed in range(8, 14):
        assert decode(kind, pieces(data, seed), engine) == decoded


@pytest.mark.parametrize("encoder", [PHONE, BROWSER], ids=["phone", "browser"])
def test_both_engines_give_the_same_audio(pcm: bytes, encoder: Encoder) -> None:
    """libopus at 16 kHz and FFmpeg at 48 kHz then resampled: the same samples, in the same
    place, to within the two resamplers' rounding, for what phones send (encoded at 16 kHz:
    SILK) and what browsers send (at 48 kHz: hybrid)."""
    data = encode_opus(pcm, "ogg", encoder=encoder)
    native, ffmpeg = decode("ogg-opus", [data], "libopus"), decode("ogg-opus", [data], "ffmpeg")
    assert abs(len(native) - len(ffmpeg)) <= 320  # 10 ms
    assert lag(pcm, native) == lag(ffmpeg, native) == 0
    assert snr_db(ffmpeg, native) > 20


def opus_head(channels: int = 1, gain: int = 0, family: int = 0) -> bytes:
    return opus._OPUS_HEAD.pack(b"OpusHead", 1, channels, 312, 16000, gain, family)


def ogg_page(like: bytes, packets: list[bytes], sequence: int, flags: int = 0) -> bytes:
    """An Ogg page of the stream `like` (its serial number) holding `packets`."""
    lacing = bytearray()
    for packet in packets:
        lacing += bytes([255] * (len(packet) // 255) + [len(packet) % 255])
    serial = HEADER.unpack_from(like)[4]
    header = HEADER.pack(b"OggS", 0, flags, 0, serial, sequence, 0, len(lacing))
    page = header + bytes(lacing) + b"".join(packets)
    return page[:22] + crc(page).to_bytes(4, "little") + page[26:]


def restamped(ogg: bytes, head: bytes) -> bytes:
    """`ogg` with `head` for its OpusHead page (the audio pages as they are)."""
    pages = ogg_pages(ogg)
    return ogg_page(ogg, [head], 0, 2) + b"".join(pages[1:])


def test_a_header_with_gain_is_decoded_by_ffmpeg_which_applies_it(ogg: bytes) -> None:
    """libopus is used without its gain control (a variadic call ctypes cannot make everywhere):
    a stream whose header asks for gain goes to FFmpeg, which applies it."""
    plain = Transcoder("ogg-opus", opus.native())
    quiet = plain.feed(ogg)
    louder = Transcoder("ogg-opus", opus.native())
    loud = louder.feed(restamped(ogg, opus_head(gain=6 * 256)))  # +6 dB (Q7.8): twice the amplitude
    assert (plain.engine, louder.engine) == ("libopus", "ffmpeg")
    assert 1.8 < rms(loud) / rms(quiet) < 2.2


def rms(pcm: bytes) -> float:
    samples = array.array("h", pcm)
    return math.sqrt(sum(v * v for v in samples) / len(samples))


def test_a_stereo_stream_is_mixed_down_by_libopus(pcm: bytes) -> None:
    stereo = io.BytesIO()
    with av.open(stereo, "w", format="ogg") as muxer:
        stream = muxer.add_stream("libopus", rate=48000)
        assert isinstance(stream, av.AudioStream)
        stream.layout = "stereo"
        frame = av.AudioFrame(format="s16", layout="stereo", samples=len(pcm) // 2)
        frame.planes[0].update(b"".join(pcm[i : i + 2] * 2 for i in range(0, len(pcm), 2)))
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            muxer.mux(packet)
    transcoder = Transcoder("ogg-opus", opus.native())
    decoded = transcoder.feed(stereo.getvalue())
    assert transcoder.engine == "libopus"
    assert abs(len(decoded) - len(pcm)) <= 640
    assert lag(pcm, decoded) == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_a_packet_opus_cannot_decode_is_named(engine: str, ogg: bytes) -> None:
    """A page whose checksum is right, after 3 of audio, whose packet is not Opus: code 3, no frames."""
    pages = ogg_pages(ogg)
    broken = b"".join(pages[:5]) + ogg_page(ogg, [b"\x7b\x00"], 5)
    with pytest.raises(ContainerError, match=r"Opus packet 4 cannot be decoded \(.+\)"):
        Transcoder("ogg-opus", engine_library(engine)).feed(broken)


@pytest.mark.parametrize("engine", ENGINES)
def test_an_empty_packet_is_no_audio_and_no_end(engine: str, ogg: bytes) -> None:
    """An empty Ogg packet holds nothing: it neither adds audio nor ends FFmpeg's decoding."""
    pages = ogg_pages(ogg)
    with_empty = b"".join(pages[:10]) + ogg_page(ogg, [b""], 10) + b"".join(pages[10:])
    assert decode("ogg-opus", [with_empty], engine) == decode("ogg-opus", [ogg], engine)


def test_a_chunk_of_many_short_packets_takes_memory_for_its_audio_not_for_the_longest_packets() -> None:
    """20,000 packets of 2.5 ms (a TOC byte each; a 64-KiB message holds 30,000 in Ogg) are 50 s
    of audio, 1.6 MB; room for 120 ms a packet would be 77 MB."""
    library = opus.native()
    assert library is not None
    decoder = library.decoder(16000, 1)
    packets = [bytes([16 << 3])] * 20_000  # CELT, narrowband, 2.5 ms, frame code 0
    tracemalloc.start()
    try:
        audio = decoder.decode(packets)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(audio) == 20_000 * 40 * 2  # 40 samples of 16 kHz a packet
    assert peak < 3 * len(audio)


def test_packet_durations_are_libopus_own(ogg: bytes) -> None:
    """`packet_ms` (which decides where a chunk is decoded) against libopus' own count, for every
    configuration and frame-count code of the table-of-contents byte."""
    library = opus.native()
    assert library is not None
    count = library._lib.opus_packet_get_nb_samples
    count.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
    for toc in range(256):
        for packet in (bytes([toc, 3]) + bytes(40), bytes([toc, 0x83]) + bytes(40)):
            assert opus.packet_ms(packet) == max(count(packet, len(packet), 48000), 0) / 48


def test_a_truncated_stream_gives_what_it_holds(ogg: bytes) -> None:
    half = Transcoder("ogg-opus", opus.native()).feed(ogg[: len(ogg) // 2 + 17])  # ends inside a page
    assert 0 < len(half) < len(Transcoder("ogg-opus", opus.native()).feed(ogg))


def test_opus_audio_without_its_header_is_refused(ogg: bytes) -> None:
    assert OggReader().feed(ogg)[0][:8] == b"OpusHead"
    with pytest.raises(ContainerError, match=r"does not begin with an Opus header \(OpusHead\)"):
        Transcoder("ogg-opus", opus.native()).feed(b"".join(ogg_pages(ogg)[1:]))  # the tags, then audio


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
