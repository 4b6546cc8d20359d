"""The token's and the client's limits inside the protocol: what the app says in WAV headers,
queries, paths and USP messages cannot get past them, on both doors and both data paths."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from speechgate.core.keyspace import Keyspace, day
from speechgate.relay import languages, usp
from tests.support.processes import Process, frozen_speech_service, wait_until
from tests.support.relays import Stack

RECOGNITION = "/speech/recognition/conversation/cognitiveservices/v1"


def wav_header(rate: int, channels: int = 1, bits: int = 16, byte_rate: int | None = None) -> bytes:
    block = channels * bits // 8
    return (
        b"RIFF\0\0\0\0WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, byte_rate or rate * block, block, bits)
        + b"data\0\0\0\0"
    )


def audio(request_id: str, payload: bytes) -> bytes:
    return usp.encode_binary("audio", request_id, payload, extra={"X-StreamId": "1"})


async def open_azure_door(stack: Stack, token: str, query: str = "language=en-US") -> ClientConnection:
    return await connect(
        f"{stack.relay.url}{RECOGNITION}?{query}",
        additional_headers={"Authorization": f"Bearer {token}"},
        max_size=2**20,
    )


async def until_closed(ws: ClientConnection) -> tuple[list[str], int | None, str]:
    """The paths Azure sent until the relay closed the stream, or until a turn ended (the Azure door
    stays open between turns: then the close code is None)."""
    paths = []
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            if isinstance(message, str):
                paths.append(usp.parse_text(message).path)
                if paths[-1] == "turn.end":
                    break
    return paths, ws.close_code, ws.close_reason or ""


async def new_token(stack: Stack, **fields: Any) -> tuple[str, str]:
    client = await asyncio.to_thread(stack.service.add_client, **fields)
    token: str = await asyncio.to_thread(stack.token, client)
    return client[0], token


def audio_counted(stack: Stack, client_id: str) -> float:
    keys = Keyspace(stack.service.settings.redis_prefix)
    with redis.Redis.from_url(stack.service.settings.redis_url or "") as client:
        return float(client.get(keys.audio_client(client_id, day())) or 0)


@pytest.fixture(params=[True, False], ids=["splice", "message-path"])
def either_path(request: pytest.FixtureRequest, stack_factory: Any) -> Stack:
    stack: Stack = stack_factory(splice=request.param)
    return stack


@pytest.mark.parametrize(
    ("header", "complaint"),
    [
        (wav_header(16000, byte_rate=2_000_000_000), "byte rate 2000000000"),
        (wav_header(16000, bits=8), "8-bit"),
        (wav_header(4000), "4000 Hz"),
        (wav_header(16000, channels=12), "12 channels"),
        (
            b"RIFF\0\0\0\0WAVEfmt " + struct.pack("<IHHIIHH", 16, 85, 1, 16000, 2000, 1, 0) + b"data\0\0\0\0",
            "format 85",
        ),
    ],
    ids=["byte-rate", "8-bit", "rate", "channels", "mp3"],
)
async def test_a_wav_header_the_relay_cannot_meter_by_is_refused(
    either_path: Stack, header: bytes, complaint: str
) -> None:
    stack = either_path
    _, token = await new_token(stack)
    request_id = usp.new_request_id()
    async with await open_azure_door(stack, token) as ws:
        await ws.send(usp.encode_text("speech.context", request_id, {}))
        await ws.send(audio(request_id, header + b"\0" * 3200))
        await ws.send(audio(request_id, b""))  # end of audio: a turn Azure took would end now
        _, code, reason = await until_closed(ws)
    assert code == 1007  # BadRequest in the SDKs: cancelled at once, with the reason shown
    assert complaint in reason
    assert stack.fake.audio_bytes == 0  # nothing of it reached Azure


async def test_audio_is_metered_by_the_validated_format(either_path: Stack) -> None:
    stack = either_path
    client_id, token = await new_token(stack)
    request_id = usp.new_request_id()
    second = b"\0\1" * 48000  # one second of 48 kHz 16-bit mono
    async with await open_azure_door(stack, token) as ws:
        await ws.send(usp.encode_text("speech.context", request_id, {}))
        await ws.send(audio(request_id, wav_header(48000) + second[:9600]))
        for start in range(9600, len(second), 9600):
            await ws.send(audio(request_id, second[start : start + 9600]))
        await ws.send(audio(request_id, b""))
        async for message in ws:
            if isinstance(message, str) and usp.parse_text(message).path == "turn.end":
                break
    # The relay writes the stream's audio when it ends, after the app has seen the close.
    assert await asyncio.to_thread(wait_until, lambda: audio_counted(stack, client_id) > 0)
    assert audio_counted(stack, client_id) == pytest.approx(1.0, abs=1e-6)


async def refusal(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """The HTTP answer of a handshake the relay refuses (fails the test if it upgrades)."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, additional_headers=headers or {}):
            pass
    response = refused.value.response
    return response.status_code, json.loads(response.body or b"{}")


@pytest.mark.parametrize(
    "path",
    [
        "/speech/recognition/conversation/../../translation/cognitiveservices/v1",
        "/speech/recognition//conversation/cognitiveservices/v1",
        "/speech/recognition/conversation/./cognitiveservices/v1",
        "/speech/recognition/conversation%2Fcognitiveservices/v1",
        "/speech/recognition/conversation/cognitiveservices/v1/%2e%2e/v1",
        "/v1/listen/../listen",
    ],
)
async def test_paths_that_would_be_read_differently_upstream_are_refused(stack: Stack, path: str) -> None:
    """A recognize-only token once opened Azure's translation path through `..`: a path with dot
    segments, empty segments or encoded separators is refused before routing and scope checks."""
    _, token = await new_token(stack, scopes=["speech:recognize"])
    status, body = await refusal(
        f"{stack.relay.url}{path}?language=en-US", {"Authorization": f"Bearer {token}"}
    )
    assert status == 400
    assert body["error"] == "invalid_path"
    assert not stack.fake.handshakes


async def test_a_reconnect_after_the_session_time_limit_says_so(stack: Stack) -> None:
    # The token must still be valid when the stream opens (a loaded CI machine took over 1 s
    # between the two), and expired when the session's limit ends the stream.
    client = await asyncio.to_thread(stack.service.add_client, max_session_s=4)
    token = await asyncio.to_thread(stack.token, client, expires_in="3")
    url = f"{stack.relay.url}/v1/listen?language=en-US&access_token={token}"
    async with connect(url) as ws:
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass
    assert ws.close_code == 4000  # the session reached its time limit; the token has expired too
    status, body = await refusal(url)
    assert status == 401
    assert body["error"] == "session_over"
    assert "time limit" in body["message"]


async def test_a_single_use_token_holds_one_stream_at_a_time(stack: Stack) -> None:
    client = await asyncio.to_thread(stack.service.add_client, max_streams_per_subject=5)
    token = await asyncio.to_thread(stack.token, client, single_use="true")
    url = f"{stack.relay.url}/v1/listen?language=en-US&access_token={token}"
    async with connect(url) as first:
        status, body = await refusal(url)
        assert status == 409
        assert body["error"] == "token_in_use"
        await first.send(json.dumps({"type": "end"}))
        with contextlib.suppress(ConnectionClosed):
            async for _ in first:
                pass
    keys = Keyspace(stack.service.settings.redis_prefix)
    with redis.Redis.from_url(stack.service.settings.redis_url or "") as db:  # the relay let it go
        assert await asyncio.to_thread(wait_until, lambda: db.zcard(keys.lease_client(client[0])) == 0)
    async with connect(url) as again:  # its session may reconnect once the first stream is gone
        await again.send(json.dumps({"type": "end"}))


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("format=mp3", "format mp3"),
        ("format=pcm&sample_rate=96000", "sample_rate"),
        ("format=pcm&sample_rate=x", "sample_rate"),
    ],
)
async def test_the_plain_door_refuses_a_format_it_cannot_take(stack: Stack, query: str, message: str) -> None:
    _, token = await new_token(stack)
    status, body = await refusal(f"{stack.relay.url}/v1/listen?language=en-US&{query}&access_token={token}")
    assert status == 400
    assert body["error"] == "unsupported_format"
    assert message in body["message"]


async def test_the_plain_door_honours_the_sample_rate_it_is_told(stack: Stack) -> None:
    client_id, token = await new_token(stack)
    url = f"{stack.relay.url}/v1/listen?language=en-US&format=pcm&sample_rate=8000&access_token={token}"
    async with connect(url) as ws:
        for _ in range(10):
            await ws.send(b"\1\0" * 1600)  # 200 ms of 8 kHz each: 2 s in all
        await ws.send(json.dumps({"type": "end"}))
        events = []
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                events.append(json.loads(message))
    assert ws.close_code == 1000
    assert stack.fake.wav_rates == [8000]  # Azure is told the rate the audio has
    assert await asyncio.to_thread(wait_until, lambda: audio_counted(stack, client_id) > 0)
    assert audio_counted(stack, client_id) == pytest.approx(2.0, abs=1e-6)


# --- languages ---------------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("query", "status", "error"),
    [
        ("language=en-US&language=de-DE", 400, "invalid_request"),
        ("language=de-DE", 403, "language_not_allowed"),
        ("profanity=raw", 403, "language_required"),
        ("language=en-US%26cid%3Dmine", 400, "invalid_request"),
        ("language=en-US%23x", 400, "invalid_request"),
    ],
)
@pytest.mark.parametrize("door", ["azure", "plain"])
async def test_the_query_language_is_one_the_token_allows(
    stack: Stack, door: str, query: str, status: int, error: str
) -> None:
    _, token = await new_token(stack, languages=["en-US"])
    if door == "azure":
        url, headers = f"{stack.relay.url}{RECOGNITION}?{query}", bearer(token)
    else:
        url, headers = f"{stack.relay.url}/v1/listen?{query}&access_token={token}", {}
    got, body = await refusal(url, headers)
    assert (got, body["error"]) == (status, error)
    assert not stack.fake.handshakes


async def test_any_language_token_needs_no_language_parameter(stack: Stack) -> None:
    _, token = await new_token(stack)
    async with await open_azure_door(stack, token, "format=simple"):
        pass
    assert stack.fake.handshakes


def context_message(body: dict[str, Any], spaced: bool = False) -> str:
    text = usp.encode_text("speech.context", usp.new_request_id(), body)
    return text.replace("Path:", "Path: ") if spaced else text  # the JavaScript SDK writes a space


@pytest.mark.parametrize(
    ("body", "spaced"),
    [
        ({"phraseDetection": {"language": "de-DE"}}, False),
        ({"phraseDetection": {"language": "de-DE"}}, True),
        ({"languageId": {"languages": ["en-US", "fr-FR"]}, "phraseDetection": {"language": "en-US"}}, True),
    ],
    ids=["phrase-language", "js-header-style", "language-id-candidates"],
)
async def test_a_language_the_token_does_not_allow_in_speech_context_ends_the_stream(
    either_path: Stack, body: dict[str, Any], spaced: bool
) -> None:
    stack = either_path
    _, token = await new_token(stack, languages=["en-US"])
    async with await open_azure_door(stack, token) as ws:
        await ws.send(context_message(body, spaced))
        _, code, reason = await until_closed(ws)
    assert code == 4000  # the SDKs cancel at once and show the reason
    assert "not allowed" in reason
    assert not stack.fake.contexts  # Azure never saw it


async def test_an_allowed_speech_context_passes(either_path: Stack) -> None:
    stack = either_path
    _, token = await new_token(stack, languages=["en-US"])
    request_id = usp.new_request_id()
    async with await open_azure_door(stack, token) as ws:
        await ws.send(context_message({"phraseDetection": {"language": "en-us"}}, spaced=True))
        await ws.send(audio(request_id, wav_header(16000) + b"\0" * 3200))
        await ws.send(audio(request_id, b""))
        paths, code, _ = await until_closed(ws)
    assert code is None
    assert paths[-1] == "turn.end"


def ssml(voice: str, lang: str = "en-US", inner: str = "hello") -> str:
    return (
        f"<speak version='1.0' xmlns='http://www.w3.org/2001/10/synthesis' xml:lang='{lang}'>"
        f"<voice name='{voice}'>{inner}</voice></speak>"
    )


@pytest.mark.parametrize(
    "document",
    [
        ssml("de-DE-KatjaNeural"),
        ssml("en-US-AvaNeural", lang="de-DE"),
        ssml("en-US-AvaMultilingualNeural", inner="<lang xml:lang='fr-FR'>bonjour</lang>"),
        ssml("Microsoft Server Speech Text to Speech Voice (de-DE, KatjaNeural)"),
        "<speak><voice name='en-US-AvaNeural'>unclosed",
    ],
    ids=["voice", "speak-lang", "lang-element", "long-voice-name", "not-xml"],
)
async def test_synthesis_in_a_language_the_token_does_not_allow_ends_the_stream(
    either_path: Stack, document: str
) -> None:
    stack = either_path
    _, token = await new_token(stack, languages=["en-US"])
    message = usp.encode_text("ssml", usp.new_request_id(), document, "application/ssml+xml")
    async with await connect(
        f"{stack.relay.url}/cognitiveservices/websocket/v1", additional_headers=bearer(token)
    ) as ws:
        await ws.send(message)
        _, code, reason = await until_closed(ws)
    assert code == 4000
    assert reason
    assert stack.fake.synthesis_sent == 0


async def test_synthesis_in_an_allowed_language_passes(either_path: Stack) -> None:
    stack = either_path
    _, token = await new_token(stack, languages=["en-US"])
    message = usp.encode_text("ssml", usp.new_request_id(), ssml("en-US-AvaNeural"), "application/ssml+xml")
    async with await connect(
        f"{stack.relay.url}/cognitiveservices/websocket/v1", additional_headers=bearer(token)
    ) as ws:
        await ws.send(message)
        paths, code, _ = await until_closed(ws)
    assert code is None
    assert paths[-1] == "turn.end"


# --- query parameters --------------------------------------------------------------------------


async def test_only_known_query_parameters_reach_azure(stack: Stack) -> None:
    _, token = await new_token(stack)
    query = "language=en-US&format=detailed&profanity=raw&debugHook=1&X-ConnectionId=abc&Authorization=x"
    async with await open_azure_door(stack, token, query):
        pass
    (seen,) = stack.fake.handshakes
    assert seen["path"] == f"{RECOGNITION}?language=en-US&format=detailed&profanity=raw&X-ConnectionId=abc"


@pytest.mark.parametrize(
    ("path", "query", "policy", "allowed"),
    [
        (RECOGNITION, "language=en-US&cid=model-1", {}, False),
        (RECOGNITION, "language=en-US&cid=model-1", {"custom_models": ["model-1"]}, True),
        (RECOGNITION, "language=en-US&CID=model-2", {"custom_models": ["model-1"]}, False),
        (RECOGNITION, "language=en-US&storeAudio=true", {}, False),
        (RECOGNITION, "language=en-US&storeAudio=true", {"store_audio": True}, True),
        ("/cognitiveservices/websocket/v1", "deploymentId=voice-1", {}, False),
        ("/cognitiveservices/websocket/v1", "deploymentId=voice-1", {"custom_voices": ["voice-1"]}, True),
    ],
)
async def test_custom_models_voices_and_stored_audio_only_as_the_policy_allows(
    stack: Stack, path: str, query: str, policy: dict[str, Any], allowed: bool
) -> None:
    _, token = await new_token(stack, **policy)
    url = f"{stack.relay.url}{path}?{query}"
    if allowed:
        async with connect(url, additional_headers=bearer(token)):
            pass
        (seen,) = stack.fake.handshakes
        assert seen["path"].endswith(query.replace("CID", "cid"))
        return
    status, body = await refusal(url, bearer(token))
    assert (status, body["error"]) == (403, "parameter_not_allowed")
    assert not stack.fake.handshakes


UNIVERSAL_RULES = languages.Rules(
    lang=("en-US", "de-DE"), scopes=frozenset({"speech:recognize"}), max_targets=1, universal=True
)


@pytest.mark.parametrize(
    ("rules", "context", "refused"),
    [
        (UNIVERSAL_RULES, {"phraseDetection": {"language": "en-US"}}, None),
        (
            UNIVERSAL_RULES,
            {"phraseDetection": {"language": "en-US"}, "translation": {"targetLanguages": ["de"]}},
            "lacks the speech:translate scope",
        ),
        (
            replace(UNIVERSAL_RULES, scopes=frozenset({"speech:translate"})),
            {"phraseDetection": {"language": "en-US"}},
            "lacks the speech:recognize scope",
        ),
        (
            replace(UNIVERSAL_RULES, scopes=frozenset({"speech:translate"})),
            {"phraseDetection": {"language": "en-US"}, "translation": {"targetLanguages": ["de"]}},
            None,
        ),
        (
            replace(UNIVERSAL_RULES, scopes=frozenset({"speech:translate"})),
            {"phraseDetection": {"language": "en-US"}, "translation": {"targetLanguages": ["de", "en"]}},
            "2 translation targets",
        ),
        (
            replace(UNIVERSAL_RULES, scopes=frozenset({"speech:translate"})),
            {"phraseDetection": {"language": "en-US"}, "translation": {"targetLanguages": ["fr"]}},
            "language fr is not allowed",
        ),
        (
            replace(UNIVERSAL_RULES, scopes=frozenset({"speech:translate"})),
            {
                "phraseDetection": {"language": "en-US"},
                "translation": {"targetLanguages": ["de"]},
                "synthesis": {"defaultVoices": {"de": "fr-FR-DeniseNeural"}},
            },
            "language fr-FR is not allowed",
        ),
        (UNIVERSAL_RULES, {"audio": {}}, "say which language"),
        (replace(UNIVERSAL_RULES, query_language=True), {"audio": {}}, None),
        (replace(UNIVERSAL_RULES, lang=("*",)), {"audio": {}}, None),
        (UNIVERSAL_RULES, {"languageId": {"languages": ["en-US", "fr-FR"]}}, "language fr-FR is not allowed"),
    ],
)
def test_universal_v2_says_in_speech_context_what_its_token_must_allow(
    rules: languages.Rules, context: dict[str, Any], refused: str | None
) -> None:
    reason = languages.refusal(rules, "speech.context", json.dumps(context).encode())
    assert (reason is None) == (refused is None), reason
    assert refused is None or refused in str(reason)


async def test_a_message_in_fragments_is_bounded_in_total_like_a_frame(either_path: Stack) -> None:
    """Each frame under the limit, the message over it: closed with 1009 on both data paths,
    and Azure never gets a message larger than the relay's limit."""
    stack = either_path
    _, token = await new_token(stack)
    limit = stack.relay.relay.settings.max_frame_bytes
    ws = await open_azure_door(stack, token)
    first = audio(usp.new_request_id(), wav_header(16000))

    async def fragments() -> Any:
        yield first
        for _ in range(2 * limit // 4096 + 1):
            yield b"\0" * 4096

    with contextlib.suppress(ConnectionClosed):
        await ws.send(fragments())
    _, code, _ = await until_closed(ws)
    assert code == 1009
    assert stack.fake.audio_bytes <= limit


async def test_audio_queued_while_azure_answers_late_is_no_flood(either_path: Stack) -> None:
    """Azure answering 3 s late (a slow resource, a failover after a connect timeout): the app's
    audio queued meanwhile once tripped the flood check, which counted real time from Azure's
    answer instead of the app's handshake."""
    stack = either_path
    stack.fake.handshake_delay_s = 3.0
    client_id, token = await new_token(stack)
    request_id = usp.new_request_id()
    second = b"\0\1" * 16000
    async with await open_azure_door(stack, token) as ws:
        await ws.send(usp.encode_text("speech.context", request_id, {}))
        await ws.send(audio(request_id, wav_header(16000) + second))
        for _ in range(19):  # 20 s at once, as an app that records in real time queues it
            await ws.send(audio(request_id, second))
        await ws.send(audio(request_id, b""))
        paths, code, reason = await until_closed(ws)
    assert (code, reason) == (None, "")  # the turn ended; the stream was not closed
    assert "turn.end" in paths
    assert await asyncio.to_thread(wait_until, lambda: audio_counted(stack, client_id) > 0)
    assert audio_counted(stack, client_id) == pytest.approx(20.0, abs=1e-6)


async def test_plain_door_audio_queued_while_azure_answers_late_is_no_flood(stack: Stack) -> None:
    stack.fake.handshake_delay_s = 3.0
    client_id, token = await new_token(stack)
    async with connect(f"{stack.relay.url}/v1/listen?language=en-US&access_token={token}") as ws:
        for _ in range(20):
            await ws.send(b"\0\1" * 16000)
        await ws.send(json.dumps({"type": "end"}))
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass
    assert ws.close_code == 1000, ws.close_reason
    assert await asyncio.to_thread(wait_until, lambda: audio_counted(stack, client_id) > 0)
    assert audio_counted(stack, client_id) == pytest.approx(20.0, abs=1e-6)


@pytest.fixture
def hung_upstream() -> Iterator[tuple[Process, str]]:
    with frozen_speech_service() as running:
        yield running


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "message-path"])
async def test_an_azure_that_stops_answering_ends_the_stream_for_the_sdk_to_reconnect(
    stack_factory: Any, hung_upstream: tuple[Process, str], splice: bool
) -> None:
    """A hung upstream (SIGSTOP) once kept its Azure-door streams for the whole hang, unanswered.
    Now its pings go unanswered and the app gets 1011: the SDKs reconnect at once, through a
    new handshake (which a pool routes elsewhere)."""
    fake, url = hung_upstream
    stack: Stack = await asyncio.to_thread(
        stack_factory, speech_endpoint=url, splice=splice, upstream_ping_s=1.0
    )
    _, token = await new_token(stack)
    request_id = usp.new_request_id()
    async with await open_azure_door(stack, token) as ws:
        await ws.send(usp.encode_text("speech.context", request_id, {}))
        await ws.send(audio(request_id, wav_header(16000) + b"\0\1" * 16000))
        assert isinstance(await asyncio.wait_for(ws.recv(), 10), str)  # Azure answers: turn.start
        assert fake.proc is not None
        os.kill(fake.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 20)
    assert ws.close_code == 1011
    assert time.monotonic() - stopped < 10  # 1 s pings: about 2-3 s
