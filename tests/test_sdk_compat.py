"""The SDK compatibility matrix: each configuration form of the official Speech SDKs that the
"SDK compatibility" table of docs/relay.md lists, through the relay to the local fake, with the
path the SDK opened as the fake recorded it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import azure.cognitiveservices.speech as speechsdk
import httpx
import pytest

from speechgate.relay.voices import VoiceList
from tests.fakes.tls_front import TlsFront
from tests.support.js_sdk import run_js
from tests.support.python_sdk import continuous
from tests.support.relays import Stack

TEXT = "Hello from the fake service."
INTERACTIVE = "/speech/recognition/interactive/cognitiveservices/v1?"


def translation_config(stack: Stack, **form: str) -> speechsdk.translation.SpeechTranslationConfig:
    client = stack.service.add_client(scopes=["speech:translate"])
    config = speechsdk.translation.SpeechTranslationConfig(**form)
    config.authorization_token = stack.token(client)
    config.speech_recognition_language = "en-US"
    config.add_target_language("de")
    return config


def translate_once(stack: Stack, config: speechsdk.translation.SpeechTranslationConfig) -> Any:
    audio = speechsdk.audio.AudioConfig(filename=str(stack.wav))
    recognizer = speechsdk.translation.TranslationRecognizer(translation_config=config, audio_config=audio)
    return recognizer.recognize_once()


def test_python_translation_recognizer_with_the_translation_endpoint(stack: Stack) -> None:
    config = translation_config(stack, endpoint=f"{stack.relay.url}/speech/translation/cognitiveservices/v1")
    result = translate_once(stack, config)
    assert result.reason == speechsdk.ResultReason.TranslatedSpeech, result.cancellation_details
    assert result.text == TEXT
    assert result.translations["de"] == f"[de] {TEXT}"
    assert stack.fake.handshakes[0]["path"].startswith("/speech/translation/cognitiveservices/v1?")


def test_python_translation_recognizer_with_a_host(stack: Stack) -> None:
    """The native SDKs (1.5x) open universal v2 with no query: the targets are in speech.context."""
    result = translate_once(stack, translation_config(stack, host=stack.relay.url))
    assert result.reason == speechsdk.ResultReason.TranslatedSpeech, result.cancellation_details
    assert result.translations["de"] == f"[de] {TEXT}"
    assert stack.fake.handshakes[0]["path"] == "/stt/speech/universal/v2"
    assert stack.fake.contexts[0]["translation"]["targetLanguages"] == ["de"]


def test_python_continuous_language_id_on_universal_v2(stack: Stack) -> None:
    """Microsoft's continuous language-identification samples: an explicit `/speech/universal/v2`."""
    client = stack.service.add_client(languages=["en-US", "de-DE"])
    config = speechsdk.SpeechConfig(endpoint=f"{stack.relay.url}/speech/universal/v2")
    config.authorization_token = stack.token(client)
    config.set_property(speechsdk.PropertyId.SpeechServiceConnection_LanguageIdMode, "Continuous")
    detect = speechsdk.languageconfig.AutoDetectSourceLanguageConfig(languages=["en-US", "de-DE"])
    recognizer = speechsdk.SpeechRecognizer(
        speech_config=config,
        auto_detect_source_language_config=detect,
        audio_config=speechsdk.audio.AudioConfig(filename=str(stack.wav)),
    )
    results = continuous(
        recognizer, "start_continuous_recognition_async", "stop_continuous_recognition_async"
    )
    assert [r.reason for r in results] == [speechsdk.ResultReason.RecognizedSpeech] * len(results), [
        r.cancellation_details.error_details for r in results
    ]
    assert len(results) >= 2
    languages = {speechsdk.AutoDetectSourceLanguageResult(r).language for r in results}
    assert languages == {"en-US"}  # the fake reports the first candidate the SDK sent
    assert stack.fake.handshakes[0]["path"].startswith("/speech/universal/v2")
    assert stack.fake.contexts[0]["languageId"]["languages"] == ["en-US", "de-DE"]


def test_python_conversation_transcriber_with_a_host(stack: Stack) -> None:
    client = stack.service.add_client()
    config = speechsdk.SpeechConfig(host=stack.relay.url)
    config.authorization_token = stack.token(client)
    config.speech_recognition_language = "en-US"
    transcriber = speechsdk.transcription.ConversationTranscriber(
        speech_config=config, audio_config=speechsdk.audio.AudioConfig(filename=str(stack.wav))
    )
    results = continuous(transcriber, "start_transcribing_async", "stop_transcribing_async")
    assert [r.text for r in results] == [TEXT] * len(results)
    assert len(results) >= 2
    assert stack.fake.handshakes[0]["path"] == "/speech/universal/v2?language=en-US"  # native SDK 1.5x


def test_python_synthesizer_with_a_host(stack: Stack) -> None:
    client = stack.service.add_client()
    config = speechsdk.SpeechConfig(host=stack.relay.url)
    config.authorization_token = stack.token(client)
    synthesizer = speechsdk.SpeechSynthesizer(speech_config=config, audio_config=None)
    result = synthesizer.speak_text_async("hello").get()
    assert result.reason == speechsdk.ResultReason.SynthesizingAudioCompleted, result.cancellation_details
    assert len(result.audio_data) > 0
    assert stack.fake.handshakes[0]["path"].startswith("/cognitiveservices/websocket/v1")


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "message-path"])
def test_python_translation_needs_the_translate_scope_inside_the_protocol(
    stack_factory: Any, splice: bool
) -> None:
    """Universal v2 with no query: a recognize-only token's translation ends at its speech.context,
    and not one byte of the audio the SDK sent behind it reaches Azure."""
    stack: Stack = stack_factory(splice=splice)
    client = stack.service.add_client(scopes=["speech:recognize"])
    config = speechsdk.translation.SpeechTranslationConfig(host=stack.relay.url)
    config.authorization_token = stack.token(client)
    config.speech_recognition_language = "en-US"
    config.add_target_language("de")
    result = translate_once(stack, config)
    assert result.reason == speechsdk.ResultReason.Canceled
    assert "speech:translate" in result.cancellation_details.error_details
    assert stack.fake.audio_bytes == 0


@pytest.mark.parametrize(
    ("scopes", "languages", "status", "locales"),
    [
        (["speech:synthesize"], ["*"], 200, ["en-US", "de-DE", "fr-FR"]),
        (["speech:synthesize"], ["de-DE"], 200, ["de-DE"]),
        (["speech:recognize"], ["*"], 403, []),
    ],
)
def test_voices_list_answers_from_azures_list_for_the_tokens_languages(
    stack: Stack, scopes: list[str], languages: list[str], status: int, locales: list[str]
) -> None:
    client = stack.service.add_client(scopes=scopes, languages=languages)
    url = stack.relay.url.replace("ws://", "http://") + "/cognitiveservices/voices/list"
    for _ in range(3):
        response = httpx.get(url, headers={"Authorization": f"Bearer {stack.token(client)}"})
        assert response.status_code == status, response.text
    if status == 200:
        assert [v["Locale"] for v in response.json()] == locales
        assert response.headers["Content-Type"] == "application/json"
        assert len(stack.fake.handshakes) == 1  # Azure asked once; the relay keeps the list
        assert stack.fake.handshakes[0]["path"] == "/cognitiveservices/voices/list"
    else:
        assert response.json()["error"] == "insufficient_scope"
        assert not stack.fake.handshakes


def test_voices_list_needs_a_valid_token_and_survives_azure_going_away(stack: Stack) -> None:
    url = stack.relay.url.replace("ws://", "http://") + "/cognitiveservices/voices/list"
    assert httpx.get(url).json()["error"] == "missing_token"
    assert httpx.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401
    stack.fake.refuse_status = 503  # Azure is away before the relay ever had the list
    token = stack.token(stack.service.add_client())
    refused = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
    assert (refused.status_code, refused.json()["error"]) == (503, "upstream_unavailable")
    assert refused.headers["Retry-After"] == "30"


async def test_voices_list_is_served_stale_while_azure_is_away(stack: Stack) -> None:
    voices = VoiceList(stack.relay.relay.settings, stack.relay.relay.credentials, httpx.AsyncClient(), ttl=0)
    fresh = await voices.get()
    stack.fake.refuse_status = 503
    assert await voices.get() == fresh  # Azure refused; the last list stands
    assert voices.fetches == 2
    assert await voices.get() == fresh
    assert voices.fetches == 2  # a stale list is retried after a pause, not on every request


# --- JavaScript (tests/js/speech.js on the machine's Node.js) ----------------------------------

WEBSOCKETS = pytest.mark.parametrize("websocket", ["ws", "native"])


@WEBSOCKETS
def test_js_from_endpoint_recognizes(node: str, stack: Stack, websocket: str) -> None:
    """`SpeechConfig.fromEndpoint` with the full v1 path; Node's built-in WebSocket sends the
    token in the query (`?Authorization=Bearer …`), as browsers do."""
    token = stack.token(stack.service.add_client())
    url = f"{stack.relay.url}/speech/recognition/interactive/cognitiveservices/v1?language=en-US"
    out = run_js(node, "recognize", url, token, str(stack.wav), websocket=websocket)
    assert out == {"reason": "RecognizedSpeech", "text": TEXT}
    assert "Authorization" not in stack.fake.handshakes[0]["path"]


@WEBSOCKETS
def test_js_from_host_recognizes(node: str, stack: Stack, websocket: str) -> None:
    token = stack.token(stack.service.add_client())
    out = run_js(node, "recognize", stack.relay.url, token, str(stack.wav), form="host", websocket=websocket)
    assert out == {"reason": "RecognizedSpeech", "text": TEXT}
    assert stack.fake.handshakes[0]["path"].startswith(
        "/speech/recognition/interactive/cognitiveservices/v1?"
    )


@WEBSOCKETS
def test_js_from_host_synthesizes(node: str, stack: Stack, websocket: str) -> None:
    token = stack.token(stack.service.add_client())
    out = run_js(node, "synthesize", stack.relay.url, token, form="host", websocket=websocket)
    assert out["reason"] == "SynthesizingAudioCompleted", out
    assert stack.fake.handshakes[0]["path"].startswith("/tts/cognitiveservices/websocket/v1")


@WEBSOCKETS
def test_js_translation_from_host(node: str, stack: Stack, websocket: str) -> None:
    token = stack.token(stack.service.add_client(scopes=["speech:translate"]))
    out = run_js(node, "translate", stack.relay.url, token, str(stack.wav), form="host", websocket=websocket)
    assert out == {"reason": "TranslatedSpeech", "text": TEXT, "de": f"[de] {TEXT}"}
    assert stack.fake.handshakes[0]["path"].startswith("/stt/speech/universal/v2")


def test_js_voices_list_from_host(node: str, stack: Stack) -> None:
    """`getVoicesAsync` with `fromHost(http(s)://…)` (its REST client takes no ws:// URL)."""
    token = stack.token(stack.service.add_client())
    host = stack.relay.url.replace("ws://", "http://")
    out = run_js(node, "voices", host, token, form="host")
    assert out["reason"] == "VoicesListRetrieved", out
    assert out["voices"] == ["en-US-AvaNeural", "de-DE-KatjaNeural", "fr-FR-HenriNeural"]


@pytest.mark.parametrize(
    ("mode", "path"),
    [("recognize", "/stt/speech/universal/v2"), ("synthesize", "/tts/cognitiveservices/websocket/v1")],
)
def test_js_bare_host_endpoint_takes_the_redirect_probes_answer(
    node: str, stack: Stack, tmp_path: Path, mode: str, path: str
) -> None:
    """`fromEndpoint(new URL("wss://host"))`: the SDK first GETs `https://host:443/<path>?
    GenerateRedirectResponse=true`; the relay answers 204 (no redirect), and the SDK connects to
    the URL it was given, on 443 through the ingress."""
    token = stack.token(stack.service.add_client())
    port = int(stack.relay.url.rpartition(":")[2])
    with TlsFront(port, tmp_path) as front:
        args = [mode, "wss://127.0.0.1", token] + ([str(stack.wav)] if mode == "recognize" else [])
        out = run_js(node, *args, env={"NODE_EXTRA_CA_CERTS": str(front.ca_path)})
    assert out["reason"] in ("RecognizedSpeech", "SynthesizingAudioCompleted"), out
    probe, connect = front.requests
    assert probe == f"GET {path}?GenerateRedirectResponse=true HTTP/1.1"
    assert connect.startswith(f"GET {path}?")
    assert stack.fake.handshakes[0]["path"].startswith(path)


def test_the_compatibility_table_names_tests_that_exist() -> None:
    """Each row of the SDK compatibility table (docs/relay.md) names a test of this suite."""
    doc = (Path(__file__).parent.parent / "docs" / "relay.md").read_text()
    table = doc.split("### SDK compatibility", 1)[1].split("Known gaps", 1)[0]
    named = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)(?:\[[^\]]*\])?`", table)
    assert len(named) >= 20
    for module, test in named:
        source = (Path(__file__).parent / (module or "test_sdk_compat.py")).read_text()
        assert f"def {test}(" in source, f"docs/relay.md names {module or 'test_sdk_compat.py'}::{test}"
