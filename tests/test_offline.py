"""The offline recognizer: its USP turns on real speech, and `speechgate dev` serving it end to end
(the reference client, the official Speech SDK) with no Azure account."""

from __future__ import annotations

import array
import asyncio
import contextlib
import io
import json
import os
import struct
import wave
from pathlib import Path
from typing import Any

import azure.cognitiveservices.speech as speechsdk
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from speechgate.devtools import offline_synthesis as synthesis
from speechgate.devtools.offline import DecoderPool, Event, OfflineTurn
from speechgate.devtools.wav import WavError, read_pcm16k
from speechgate.relay import usp
from tests.support.cli import SPEECHGATE
from tests.support.dev import Dev, token
from tests.support.js_sdk import run_js
from tests.support.processes import Process, free_port
from tests.support.python_sdk import continuous

SPEECH_WAV = Path(__file__).parent / "data" / "speech.wav"  # espeak-ng: two sentences, 1 s apart
TICKS_PER_S = 10_000_000
INTERACTIVE = "/speech/recognition/interactive/cognitiveservices/v1?language=en-US"
SYNTHESIS = "/cognitiveservices/websocket/v1"


@pytest.fixture(scope="module")
def pool() -> DecoderPool:
    return DecoderPool()


def run_turn(pool: DecoderPool, pcm: bytes, **options: Any) -> list[Event]:
    turn = OfflineTurn(pool.take(), **options)
    events: list[Event] = []
    for offset in range(0, len(pcm), 3200):
        events += turn.feed(pcm[offset : offset + 3200])
    events += turn.finish()
    turn.close()
    pool.give_back(turn.decoder)
    return events


def test_a_turn_gives_what_azure_gives_in_order_with_plausible_times(pool: DecoderPool) -> None:
    pcm = read_pcm16k(SPEECH_WAV)
    audio_ticks = len(pcm) * TICKS_PER_S // 32000
    events = run_turn(pool, pcm)
    paths = [path for path, _ in events]
    assert paths[0] == "turn.start"
    assert paths[1] == "speech.startDetected"
    assert paths[-2:] == ["speech.endDetected", "turn.end"]
    assert paths.index("speech.hypothesis") < paths.index("speech.phrase")
    phrases = [body for path, body in events if path == "speech.phrase"]
    assert len(phrases) == 2  # one per sentence: the pause between them ends the first
    for body in phrases:
        assert body["RecognitionStatus"] == "Success"
        assert body["DisplayText"][0].isupper()
        assert body["DisplayText"].endswith(".")
        assert 0 < body["Offset"] < body["Offset"] + body["Duration"] <= audio_ticks
    # The second sentence starts after the first one ends (and after the 1 s pause in the file).
    assert phrases[1]["Offset"] >= phrases[0]["Offset"] + phrases[0]["Duration"] + TICKS_PER_S // 2
    assert events[-2][1]["Offset"] == audio_ticks - audio_ticks % (TICKS_PER_S * 3 // 100)


def test_interactive_mode_ends_the_turn_after_the_first_phrase(pool: DecoderPool) -> None:
    events = run_turn(pool, read_pcm16k(SPEECH_WAV), mode="interactive")
    paths = [path for path, _ in events]
    assert paths.count("speech.phrase") == 1
    assert paths.count("turn.end") == 1
    assert paths[-1] == "turn.end"


def test_detailed_format_gives_nbest_with_a_confidence(pool: DecoderPool) -> None:
    events = run_turn(pool, read_pcm16k(SPEECH_WAV), detailed=True)
    (first, *_) = [body for path, body in events if path == "speech.phrase"]
    best = first["NBest"][0]
    assert "DisplayText" not in first
    assert best["Lexical"]
    assert best["Display"] == best["Lexical"][0].upper() + best["Lexical"][1:] + "."
    assert 0.0 <= best["Confidence"] <= 1.0


def test_silence_gives_a_no_match_phrase_so_the_sdks_do_not_hang(pool: DecoderPool) -> None:
    events = run_turn(pool, bytes(32000))
    phrases = [body for path, body in events if path == "speech.phrase"]
    # 1 s of silence, less what does not fill a 30 ms frame.
    assert phrases == [{"RecognitionStatus": "InitialSilenceTimeout", "Offset": 0, "Duration": 9_900_000}]
    # Interactive mode gives up by itself after 5 s of silence, as Azure does.
    events = run_turn(pool, bytes(6 * 32000), mode="interactive")
    assert [path for path, _ in events].count("turn.end") == 1
    (phrase,) = [body for path, body in events if path == "speech.phrase"]
    assert phrase["RecognitionStatus"] == "InitialSilenceTimeout"
    assert 5 * TICKS_PER_S <= phrase["Duration"] < 5.03 * TICKS_PER_S  # at the 30 ms frame it happened


def test_a_continuation_turn_keeps_the_stream_time_line(pool: DecoderPool) -> None:
    pcm = read_pcm16k(SPEECH_WAV)
    plain = [b for p, b in run_turn(pool, pcm) if p == "speech.phrase"]
    later = [b for p, b in run_turn(pool, pcm, base_s=60.0) if p == "speech.phrase"]
    assert [b["Offset"] - 60 * TICKS_PER_S for b in later] == [b["Offset"] for b in plain]


# --- `speechgate dev` with no Azure account ------------------------------------------------


def test_dev_says_it_recognizes_offline_and_how_to_try_it(offline_dev: Dev) -> None:
    output = offline_dev.output
    assert "OFFLINE recognizer (PocketSphinx): English only, low accuracy" in output
    assert "synthesis: espeak-ng, PCM output formats" in output  # .ci/run installs espeak-ng
    assert "     speechgate stream some.wav" in output  # not in a checkout: the installed command
    assert f"{offline_dev.relay_url.replace('ws://', 'http://')}/demo" in output


def test_stream_prints_finals_and_a_summary(offline_dev: Dev) -> None:
    result = offline_dev.stream(str(SPEECH_WAV), "--fast")
    assert result.returncode == 0, result.stderr
    finals = result.stdout.splitlines()
    assert len(finals) == 2
    assert all(line.strip() and line.endswith(".") for line in finals)
    assert "4.8 s of audio, 2 final result(s); first partial after" in result.stderr
    assert "Traceback" not in result.stderr


def test_stream_json_events_in_real_time(offline_dev: Dev) -> None:
    result = offline_dev.stream(str(SPEECH_WAV), "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "partial"
    assert kinds.count("final") == 2
    assert kinds[-1] == "summary"
    summary = events[-1]
    assert summary["audio_s"] == 4.83
    # Real time: the first partial comes while the file is still being sent, not after it.
    assert 0 < summary["first_partial_s"] < 4.0
    assert 0 < summary["final_latency_s"] < 3.0
    finals = [e for e in events if e["type"] == "final"]
    assert 0 < finals[0]["offset_ms"] < finals[1]["offset_ms"] < 4830


def test_stream_through_the_official_sdk(offline_dev: Dev) -> None:
    result = offline_dev.stream(str(SPEECH_WAV), "--sdk", "--fast", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 2
    assert all(e["text"] for e in finals)
    assert 0 < finals[0]["offset_ms"] < finals[1]["offset_ms"] < 4830


def sdk_config(dev: Dev, path: str) -> speechsdk.SpeechConfig:
    config = speechsdk.SpeechConfig(endpoint=f"{dev.relay_url}{path}")
    config.authorization_token = token(dev)
    return config


def test_the_official_sdk_recognizes_once_offline(offline_dev: Dev) -> None:
    recognizer = speechsdk.SpeechRecognizer(
        speech_config=sdk_config(offline_dev, INTERACTIVE),
        audio_config=speechsdk.audio.AudioConfig(filename=str(SPEECH_WAV)),
    )
    result = recognizer.recognize_once()
    assert result.reason == speechsdk.ResultReason.RecognizedSpeech, result.cancellation_details
    assert result.text
    assert 0 < result.offset < result.offset + result.duration < 2 * TICKS_PER_S  # the first sentence


def synthesize(dev: Dev, ssml: str, output: Any = None) -> speechsdk.SpeechSynthesisResult:
    config = sdk_config(dev, SYNTHESIS)
    if output is not None:
        config.set_speech_synthesis_output_format(output)
    result: speechsdk.SpeechSynthesisResult = (
        speechsdk.SpeechSynthesizer(speech_config=config, audio_config=None).speak_ssml_async(ssml).get()
    )
    return result


def ssml(text: str, language: str = "en-US") -> str:
    return f"<speak version='1.0' xml:lang='{language}'><voice name='en-US-AvaNeural'>{text}</voice></speak>"


def wav_of(result: speechsdk.SpeechSynthesisResult) -> tuple[int, array.array[int]]:
    """The sample rate and samples of a synthesis result's WAV."""
    with wave.open(io.BytesIO(result.audio_data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        return wav.getframerate(), array.array("h", wav.readframes(wav.getnframes()))


def test_the_official_sdk_synthesizes_offline_and_the_recognizer_hears_speech(offline_dev: Dev) -> None:
    result = synthesize(offline_dev, ssml("Hello world. This is the offline voice."))
    assert result.reason == speechsdk.ResultReason.SynthesizingAudioCompleted, result.cancellation_details
    rate, samples = wav_of(result)
    assert rate == 16000  # the SDK's default, raw-16khz-16bit-mono-pcm on the wire
    assert 1.5 < len(samples) / rate < 5.0  # two short sentences
    assert max(abs(x) for x in samples) > 3000  # not silence
    push = speechsdk.audio.PushAudioInputStream()  # 16 kHz 16-bit mono, as synthesized
    recognizer = speechsdk.SpeechRecognizer(
        speech_config=sdk_config(offline_dev, INTERACTIVE),
        audio_config=speechsdk.audio.AudioConfig(stream=push),
    )
    future = recognizer.recognize_once_async()
    push.write(samples.tobytes())
    push.close()
    heard = future.get()
    assert heard.reason == speechsdk.ResultReason.RecognizedSpeech, heard.cancellation_details
    assert heard.text


def test_the_javascript_sdk_synthesizes_offline(node: str, offline_dev: Dev) -> None:
    out = run_js(node, "synthesize", f"{offline_dev.relay_url}{SYNTHESIS}", token(offline_dev))
    assert out["reason"] == "SynthesizingAudioCompleted", out  # riff-16khz-16bit-mono-pcm in Node
    assert out["bytes"] > 8000  # "hello": over a quarter second of 16 kHz audio


def test_offline_synthesis_in_another_pcm_format_and_language(offline_dev: Dev) -> None:
    result = synthesize(
        offline_dev, ssml("Guten Tag", "de-DE"), speechsdk.SpeechSynthesisOutputFormat.Riff24Khz16BitMonoPcm
    )
    assert result.reason == speechsdk.ResultReason.SynthesizingAudioCompleted, result.cancellation_details
    rate, samples = wav_of(result)
    assert rate == 24000
    assert 0.3 < len(samples) / rate < 3.0


@pytest.mark.parametrize(
    ("text", "language", "output", "reason"),
    [
        (
            "hello",
            "en-US",
            speechsdk.SpeechSynthesisOutputFormat.Audio16Khz32KBitRateMonoMp3,
            "16-bit mono PCM formats only, not audio-16khz-32kbitrate-mono-mp3",  # whole, in a close reason
        ),
        ("hello", "xx-XX", None, "espeak-ng has no voice for xx-XX"),
        ("", "en-US", None, "no text to speak"),
    ],
)
def test_what_offline_synthesis_cannot_do_is_cancelled_at_once_with_the_reason(
    offline_dev: Dev, text: str, language: str, output: Any, reason: str
) -> None:
    result = synthesize(offline_dev, ssml(text, language), output)
    assert result.reason == speechsdk.ResultReason.Canceled
    details = result.cancellation_details
    assert details.error_code == speechsdk.CancellationErrorCode.BadRequest, details.error_details
    assert reason in details.error_details
    assert "Azure" not in details.error_details  # the refusal is the offline stand-in's, and says so


def test_without_espeak_ng_dev_says_so_and_synthesis_is_cancelled_with_how_to_get_it(
    tmp_path: Path,
) -> None:
    env = {"SPEECHGATE_PORT": str(free_port()), "SPEECHGATE_RELAY_PORT": str(free_port())}
    clean = {k: v for k, v in os.environ.items() if k not in ("SPEECH_KEY", "SPEECH_REGION", "REDIS_URL")}
    clean["PATH"] = str(Path(SPEECHGATE).parent)  # the virtual environment only: no espeak-ng (nor Redis)
    with Process([SPEECHGATE, "dev"], "Uvicorn running on", env={**clean, **env}, cwd=tmp_path) as proc:
        dev = Dev(tmp_path, env, f"ws://127.0.0.1:{env['SPEECHGATE_RELAY_PORT']}", "".join(proc.output))
        assert "synthesis: none: install espeak-ng for it" in dev.output
        result = synthesize(dev, ssml("hello"))
    assert result.reason == speechsdk.ResultReason.Canceled
    assert "apt install espeak-ng for offline synthesis" in result.cancellation_details.error_details


def test_offline_synthesis_answers_as_azure_does() -> None:
    assert synthesis.pcm_format("raw-16khz-16bit-mono-pcm") == (False, 16000)
    assert synthesis.pcm_format("riff-22050hz-16bit-mono-pcm") == (True, 22050)
    for unsupported in (
        "audio-24khz-48kbitrate-mono-mp3",
        "raw-16khz-8bit-mono-pcm",
        "raw-1khz-16bit-mono-pcm",
    ):
        with pytest.raises(synthesis.SynthesisError, match="16-bit mono PCM formats only"):
            synthesis.pcm_format(unsupported)
    assert synthesis.ssml_text(ssml("Hello <break time='1s'/> <emphasis>world</emphasis>")) == (
        "Hello world",
        "en-US",
    )
    with pytest.raises(synthesis.SynthesisError, match="does not parse"):
        synthesis.ssml_text("<speak>unclosed")
    pcm = bytes(range(256)) * 50  # 12,800 bytes: 0.4 s at 16 kHz
    messages = synthesis.synthesis_messages("r1", pcm, True, 16000)
    texts = [usp.parse_text(m) for m in messages if isinstance(m, str)]
    assert [m.path for m in texts] == ["turn.start", "response", "turn.end"]
    assert all(m.request_id == "r1" for m in texts)
    stream_id = texts[1].json()["audio"]["streamId"]
    audio = [usp.parse_binary(m) for m in messages if isinstance(m, bytes)]
    assert isinstance(messages[2], bytes)  # audio only after `response`, which the JS SDK waits for
    assert all(a.header("X-StreamId") == stream_id and a.path == "audio" for a in audio)
    assert [len(a.body) for a in audio] == [3200, 3200, 3200, 3200, 44]  # 100 ms each
    assert b"".join(a.body for a in audio) == usp.riff_header(16000) + pcm


def test_another_language_offline_is_refused_with_the_reason(offline_dev: Dev) -> None:
    async def attempt() -> tuple[int | None, str]:
        url = f"{offline_dev.relay_url}/v1/listen?language=de-DE"
        async with connect(url, additional_headers={"Authorization": f"Bearer {token(offline_dev)}"}) as ws:
            with contextlib.suppress(ConnectionClosed):
                await ws.recv()
            return ws.close_code, ws.close_reason or ""

    code, reason = asyncio.run(attempt())
    assert code == 1013
    assert "offline recognizer: English (en-US) only" in reason


def test_stream_errors_say_what_to_fix(offline_dev: Dev, tmp_path: Path) -> None:
    missing = offline_dev.stream(str(tmp_path / "nope.wav"))
    assert missing.returncode == 2
    assert "nope.wav: no such file" in missing.stderr
    not_wav = tmp_path / "notes.wav"
    not_wav.write_text("not audio")
    bad = offline_dev.stream(str(not_wav))
    assert bad.returncode == 2
    assert "notes.wav: not a WAV file (no RIFF/WAVE header)" in bad.stderr
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert "empty.wav: the file is empty, not a WAV file" in offline_dev.stream(str(empty)).stderr
    token_service = offline_dev.env["SPEECHGATE_PORT"]
    wrong = offline_dev.stream(str(SPEECH_WAV), "--relay-url", f"ws://127.0.0.1:{token_service}")
    assert wrong.returncode == 1
    assert "without the relay's JSON: is it the relay?" in wrong.stderr
    refused = offline_dev.stream(str(SPEECH_WAV), "--client-id", "dev-client", "--client-secret", "wrong")
    assert refused.returncode == 1
    assert "the token service refused the client (401)" in refused.stderr
    nowhere = offline_dev.stream(str(SPEECH_WAV), "--relay-url", f"ws://127.0.0.1:{free_port()}")
    assert nowhere.returncode == 1
    assert "cannot reach the relay at ws://127.0.0.1:" in nowhere.stderr
    for result in (missing, bad, refused, nowhere, wrong):
        assert "Traceback" not in result.stderr


def test_stream_converts_other_wavs(offline_dev: Dev, tmp_path: Path) -> None:
    # The fixture as 44.1 kHz stereo 8-bit: converted by the client, recognized the same way.
    pcm = array.array("h", read_pcm16k(SPEECH_WAV))
    converted = tmp_path / "stereo.wav"
    with wave.open(str(converted), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(1)
        out.setframerate(44100)
        frames = bytearray()
        for i in range(len(pcm) * 44100 // 16000):
            sample = (pcm[i * 16000 // 44100] >> 8) + 128
            frames += bytes((sample, sample))
        out.writeframes(bytes(frames))
    result = offline_dev.stream(str(converted), "--fast", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["audio_s"] == 4.83
    assert [e for e in events if e["type"] == "final"]


def extensible_wav(pcm16: bytes, bits: int, channels: int, tag: int = 1) -> bytes:
    """A WAVE_FORMAT_EXTENSIBLE file (as sox writes 24-bit audio) of the same samples."""
    width = bits // 8
    frames = b"".join((b"\0" * (width - 2) + pcm16[i : i + 2]) * channels for i in range(0, len(pcm16), 2))
    guid = struct.pack("<H", tag) + bytes.fromhex("000000001000800000aa00389b71")
    fmt = (
        struct.pack(
            "<HHIIHHHHI",
            0xFFFE,
            channels,
            16000,
            16000 * width * channels,
            width * channels,
            bits,
            22,
            bits,
            0,
        )
        + guid
    )
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(frames))
        + frames
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_extensible_wavs_are_read_as_the_pcm_they_hold(tmp_path: Path) -> None:
    pcm = read_pcm16k(SPEECH_WAV)[:32000]
    for bits, channels in ((24, 1), (32, 2), (16, 2)):
        path = tmp_path / f"x{bits}.wav"
        path.write_bytes(extensible_wav(pcm, bits, channels))
        assert read_pcm16k(path) == pcm
    floats = tmp_path / "float.wav"
    floats.write_bytes(extensible_wav(pcm, 32, 1, tag=3))
    with pytest.raises(WavError, match="floating-point audio, not PCM; convert it"):
        read_pcm16k(floats)


@pytest.mark.parametrize("cut_s", [0.8, 1.0, 1.2, 3.6])
def test_audio_that_ends_mid_utterance_on_a_frame_boundary_still_ends_the_turn(
    pool: DecoderPool, cut_s: float
) -> None:
    """The app stops in the middle of a sentence, after a whole number of 100-ms frames (as
    3,200-byte chunks always are): the turn still ends with a phrase, never an exception."""
    pcm = read_pcm16k(SPEECH_WAV)[: int(cut_s * 10) * 3200]
    events = run_turn(pool, pcm)
    paths = [path for path, _ in events]
    assert paths[-2:] == ["speech.endDetected", "turn.end"]
    assert "speech.phrase" in paths


def test_offline_recognition_answers_universal_v2_as_the_sdks_open_it(offline_dev: Dev) -> None:
    """ConversationTranscriber with a host and an explicit `/speech/universal/v2` (what the native
    SDKs 1.5x open) are recognized offline like v1's conversation mode; translation, which the
    offline stand-in cannot do, is refused saying so."""
    config = speechsdk.SpeechConfig(host=offline_dev.relay_url)
    config.authorization_token = token(offline_dev)
    config.speech_recognition_language = "en-US"
    audio = speechsdk.audio.AudioConfig(filename=str(SPEECH_WAV))
    transcriber = speechsdk.transcription.ConversationTranscriber(speech_config=config, audio_config=audio)
    texts = [r.text for r in continuous(transcriber, "start_transcribing_async", "stop_transcribing_async")]
    assert [t for t in texts if t]  # words, whatever PocketSphinx makes of them
    once = speechsdk.SpeechRecognizer(
        speech_config=sdk_config(offline_dev, "/speech/universal/v2"),
        audio_config=speechsdk.audio.AudioConfig(filename=str(SPEECH_WAV)),
    ).recognize_once()
    assert once.reason == speechsdk.ResultReason.RecognizedSpeech, once.cancellation_details
    translation = speechsdk.translation.SpeechTranslationConfig(
        endpoint=f"{offline_dev.relay_url}/speech/translation/cognitiveservices/v1"
    )
    translation.authorization_token = token(offline_dev)
    translation.speech_recognition_language = "en-US"
    translation.add_target_language("de")
    refused = speechsdk.translation.TranslationRecognizer(
        translation_config=translation, audio_config=speechsdk.audio.AudioConfig(filename=str(SPEECH_WAV))
    ).recognize_once()
    assert refused.reason == speechsdk.ResultReason.Canceled
    assert "no translation here" in refused.cancellation_details.error_details, refused.cancellation_details


def test_the_same_audio_gives_the_same_words_whatever_came_before_and_however_it_is_cut(
    pool: DecoderPool,
) -> None:
    """A pooled decoder forgets what it heard (PocketSphinx adapts its cepstral mean as it
    listens): before, the same file gave other words on each run, which no test could pin down."""
    pcm = read_pcm16k(SPEECH_WAV)

    def phrases(chunk: int) -> list[Any]:
        turn = OfflineTurn(pool.take())
        events: list[Event] = []
        for offset in range(0, len(pcm), chunk):
            events += turn.feed(pcm[offset : offset + chunk])
        events += turn.finish()
        turn.close()
        pool.give_back(turn.decoder)
        return [body for path, body in events if path == "speech.phrase"]

    first = phrases(3200)
    assert len(first) == 2
    assert [phrases(3200), phrases(1000), phrases(6400)] == [first, first, first]
