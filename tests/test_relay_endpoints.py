"""Every path the official Speech SDKs open: routed to the right Azure service, with its scope,
its query parameters and its languages; the paths the relay does not serve refused by name."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import azure.cognitiveservices.speech as speechsdk
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from speechgate.core.settings import Settings
from speechgate.relay.auth import Refusal
from speechgate.relay.endpoints import endpoint_for, upstream_path
from speechgate.relay.upstream import upstream_url
from tests.support.relays import Stack


@pytest.mark.parametrize(
    ("path", "kind", "service"),
    [
        ("/speech/recognition/conversation/cognitiveservices/v1", "recognition", "stt"),
        ("/speech/recognition/interactive/cognitiveservices/v1", "recognition", "stt"),
        ("/speech/recognition/dictation/cognitiveservices/v1", "recognition", "stt"),
        ("/stt/speech/recognition/conversation/cognitiveservices/v1", "recognition", "stt"),
        ("/speech/universal/v2", "universal", "stt"),
        ("/stt/speech/universal/v2", "universal", "stt"),
        ("/speech/translation/cognitiveservices/v1", "translation", "s2s"),
        ("/cognitiveservices/websocket/v1", "synthesis", "tts"),
        ("/tts/cognitiveservices/websocket/v1", "synthesis", "tts"),
        ("/v1/listen", "plain", ""),
    ],
)
def test_each_sdk_path_has_its_endpoint(path: str, kind: str, service: str) -> None:
    endpoint = endpoint_for(path)
    assert (endpoint.kind, endpoint.service) == (kind, service)


def test_a_region_is_reached_on_each_services_own_host() -> None:
    settings = Settings(speech_region="westeurope")
    for path, host, upstream in [
        ("/speech/universal/v2", "westeurope.stt", "/speech/universal/v2"),
        ("/stt/speech/universal/v2", "westeurope.stt", "/stt/speech/universal/v2"),
        (
            "/stt/speech/recognition/interactive/cognitiveservices/v1",
            "westeurope.stt",
            "/speech/recognition/interactive/cognitiveservices/v1",
        ),
        (
            "/speech/translation/cognitiveservices/v1",
            "westeurope.s2s",
            "/speech/translation/cognitiveservices/v1",
        ),
        ("/tts/cognitiveservices/websocket/v1", "westeurope.tts", "/tts/cognitiveservices/websocket/v1"),
    ]:
        endpoint = endpoint_for(path)
        url = upstream_url(settings, endpoint.service, upstream_path(endpoint, path, False), "a=1")
        assert url == f"wss://{host}.speech.microsoft.com{upstream}?a=1"
    custom = endpoint_for("/stt/speech/recognition/conversation/cognitiveservices/v1")
    assert upstream_path(
        custom, "/stt/speech/recognition/conversation/cognitiveservices/v1", True
    ).startswith("/stt/")


@pytest.mark.parametrize(
    ("path", "what"),
    [
        ("/speech/recognition/multiaudio", "meeting transcription"),
        ("/api/v3", "Direct Line Speech"),
        ("/commands/api/v1", "Custom Commands"),
    ],
)
async def test_paths_the_relay_does_not_serve_are_refused_by_name(stack: Stack, path: str, what: str) -> None:
    with pytest.raises(Refusal) as refused:
        endpoint_for(path)
    assert refused.value.status == 404
    with pytest.raises(InvalidStatus) as answered:
        async with connect(f"{stack.relay.url}{path}"):
            pass
    body = json.loads(answered.value.response.body or b"{}")
    assert answered.value.response.status_code == 404
    assert body["error"] == "unsupported_endpoint"
    assert path in body["message"]
    assert what in body["message"]


async def token(stack: Stack, **fields: Any) -> str:
    client = await asyncio.to_thread(stack.service.add_client, **fields)
    value: str = await asyncio.to_thread(stack.token, client)
    return value


@pytest.mark.parametrize(
    "target",
    [
        "/stt/speech/universal/v2?language=en-US",
        "/speech/universal/v2?language=en-US",
        "/stt/speech/recognition/interactive/cognitiveservices/v1?language=en-US",
        "/tts/cognitiveservices/websocket/v1",
    ],
)
async def test_each_path_reaches_azure_as_the_sdk_opened_it(stack: Stack, target: str) -> None:
    bearer = {"Authorization": f"Bearer {await token(stack)}"}
    async with connect(f"{stack.relay.url}{target}", additional_headers=bearer):
        pass
    (seen,) = stack.fake.handshakes
    assert seen["path"] == target  # the fake stands for a custom domain: paths go as they came


@pytest.mark.parametrize(
    ("target", "scopes", "status"),
    [
        ("/speech/translation/cognitiveservices/v1?from=en-US&to=de", ["speech:recognize"], 403),
        ("/speech/translation/cognitiveservices/v1?from=en-US&to=de", ["speech:translate"], 101),
        ("/stt/speech/universal/v2?language=en-US&to=de", ["speech:recognize"], 403),
        ("/stt/speech/universal/v2?language=en-US&to=de", ["speech:translate"], 101),
        # with no targets in its query, universal v2 may translate as its speech.context says
        # (checked there: tests/test_sdk_compat.py); a token that can do neither is refused here
        ("/stt/speech/universal/v2?language=en-US", ["speech:translate"], 101),
        ("/stt/speech/universal/v2?language=en-US", ["speech:synthesize"], 403),
    ],
)
async def test_translation_needs_the_translate_scope(
    stack: Stack, target: str, scopes: list[str], status: int
) -> None:
    bearer = {"Authorization": f"Bearer {await token(stack, scopes=scopes)}"}
    if status == 101:
        async with connect(f"{stack.relay.url}{target}", additional_headers=bearer):
            pass
        assert stack.fake.handshakes[0]["path"] == target
        return
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{stack.relay.url}{target}", additional_headers=bearer):
            pass
    assert refused.value.response.status_code == status
    assert json.loads(refused.value.response.body or b"{}")["error"] == "insufficient_scope"


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("from=en-US&to=de", None),
        ("from=en-US&to=de-DE", None),
        ("from=fr-FR&to=de", "language_not_allowed"),
        ("from=en-US&to=fr", "language_not_allowed"),
        ("from=en-US&to=de,en", None),
        ("from=en-US&to=de&to=en&to=de-DE", "too_many_targets"),
        ("to=de", "language_required"),
    ],
)
async def test_translation_languages_and_targets_hold(stack: Stack, query: str, error: str | None) -> None:
    fields = {"scopes": ["speech:translate"], "languages": ["en-US", "de-DE"]}
    bearer = {"Authorization": f"Bearer {await token(stack, **fields)}"}
    url = f"{stack.relay.url}/speech/translation/cognitiveservices/v1?{query}"
    if error is None:
        async with connect(url, additional_headers=bearer):
            pass
        return
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, additional_headers=bearer):
            pass
    assert json.loads(refused.value.response.body or b"{}")["error"] == error
    assert not stack.fake.handshakes


def test_the_python_sdk_configured_with_a_host_recognizes(stack: Stack) -> None:
    """`SpeechConfig(host=…)`, the form Microsoft's docs show for containers and custom hosts."""
    client = stack.service.add_client()
    config = speechsdk.SpeechConfig(host=stack.relay.url)
    config.authorization_token = stack.token(client)
    audio = speechsdk.audio.AudioConfig(filename=str(stack.wav))
    result = speechsdk.SpeechRecognizer(speech_config=config, audio_config=audio).recognize_once()
    assert result.reason == speechsdk.ResultReason.RecognizedSpeech, result.cancellation_details
    assert stack.fake.handshakes[0]["path"].startswith(
        "/speech/recognition/interactive/cognitiveservices/v1?"
    )


def test_every_refusal_the_relay_raises_has_its_metric_series_from_the_start() -> None:
    """The relay's refusal series are created at start from REFUSAL_ERRORS (a panel on one reads
    0 before its first refusal): an error code raised anywhere must be in that list."""
    import re
    from pathlib import Path

    from speechgate import relay
    from speechgate.relay.admission import REFUSALS, UPSTREAM_REFUSALS
    from speechgate.relay.auth import REFUSAL_ERRORS

    package = Path(relay.__file__).parent
    source = "\n".join(p.read_text(encoding="utf-8") for p in package.rglob("*.py"))
    raised = set(re.findall(r'Refusal\(\s*\d{3},\s*"([a-z_]+)"', source))
    raised |= {error for _, error, _ in (*REFUSALS.values(), *UPSTREAM_REFUSALS.values())}
    assert len(raised) >= 15
    assert raised <= set(REFUSAL_ERRORS), sorted(raised - set(REFUSAL_ERRORS))
