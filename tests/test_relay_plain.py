"""The plain front door with a `websockets` client, and the session rules of both doors."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import math
import re
import time
from typing import Any

import jwt
import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from speechgate.cli.common import Deps
from speechgate.core.keyspace import Keyspace
from speechgate.core.logs import JsonFormatter
from speechgate.core.settings import Settings
from speechgate.devtools.compress import encode_opus
from tests.fakes.speech import KEY
from tests.support.cli import Cli
from tests.support.processes import wait_until
from tests.support.relays import Stack, refusal_status

FRAME = b"\x01\x00" * 1600  # 100 ms of 16 kHz 16-bit mono


def url(stack: Stack, token: str, language: str = "en-US") -> str:
    return f"{stack.relay.url}/v1/listen?language={language}&format=pcm16k&access_token={token}"


async def events_until_close(ws: ClientConnection) -> tuple[list[dict[str, Any]], int | None, str]:
    events = []
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            events.append(json.loads(message))
    return events, ws.close_code, ws.close_reason or ""


async def new_client(stack: Stack, **fields: Any) -> tuple[str, str]:
    client: tuple[str, str] = await asyncio.to_thread(stack.service.add_client, **fields)
    return client


async def new_token(stack: Stack, client: tuple[str, str], **params: str) -> str:
    token: str = await asyncio.to_thread(stack.token, client, **params)
    return token


async def test_audio_in_events_out_in_order_and_nothing_lost(stack: Stack) -> None:
    token = await new_token(stack, await new_client(stack))
    async with connect(url(stack, token)) as ws:
        for _ in range(20):  # 2 s of audio
            await ws.send(FRAME)
        await ws.send(json.dumps({"type": "end"}))
        events, code, _ = await events_until_close(ws)
    assert code == 1000
    kinds = [e["type"] for e in events]
    assert kinds.count("final") == 3  # one per second heard, and the last one
    assert kinds[0] == "partial"
    finals = [e for e in events if e["type"] == "final"]
    assert [e["offset_ms"] for e in finals] == [0, 1000, 2000]
    assert all(e["text"] == "Hello from the fake service." and e["duration_ms"] == 800 for e in finals)
    assert stack.fake.audio_bytes == 20 * len(FRAME)


@pytest.mark.parametrize(
    ("send", "code", "words"),
    [
        ("not json", 1007, "must be JSON"),
        (json.dumps({"type": "pause"}), 1003, "unknown message type 'pause'"),
        (b"\0" * 70_000, 1009, ""),
    ],
)
async def test_bad_frames_close_with_their_code(
    stack: Stack, send: str | bytes, code: int, words: str
) -> None:
    token = await new_token(stack, await new_client(stack))
    async with connect(url(stack, token)) as ws:
        await ws.send(send)
        _, closed, reason = await events_until_close(ws)
    assert closed == code
    assert words in reason


async def test_audio_far_faster_than_real_time_is_refused(stack: Stack) -> None:
    token = await new_token(stack, await new_client(stack))
    async with connect(url(stack, token)) as ws:
        with contextlib.suppress(ConnectionClosed):  # the relay may close while we still send
            for _ in range(200):  # 20 s of audio at once
                await ws.send(FRAME)
        _, code, reason = await events_until_close(ws)
    assert code == 1008
    assert "faster than real time" in reason


async def _refusal(target: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(target):
            pass
    response = info.value.response
    return response.status_code, json.loads(response.body), dict(response.headers.raw_items())


async def test_a_subject_gets_exactly_its_streams_then_429(stack: Stack) -> None:
    client = await new_client(stack, max_streams_per_subject=2)
    tokens = [await new_token(stack, client, subject="alice") for _ in range(3)]
    async with connect(url(stack, tokens[0])), connect(url(stack, tokens[1])):
        status, body, headers = await _refusal(url(stack, tokens[2]))
        assert status == 429
        assert body["error"] == "too_many_streams"
        assert 1 <= int(headers["Retry-After"]) <= 15
        other = await new_token(stack, client, subject="bob")
        async with connect(url(stack, other)):
            pass  # another user is not limited by alice's streams
    # Alice's slots are free again once the relay has released her streams (just after the close).
    deadline = time.monotonic() + 5
    while (await refusal_status(url(stack, tokens[2]))) == 429:
        assert time.monotonic() < deadline, "the closed streams' slots were never released"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("params", "status", "error"),
    [
        ({"scope": "speech:synthesize"}, 403, "insufficient_scope"),
        ({"language": "de-DE"}, 403, "language_not_allowed"),
    ],
)
async def test_scope_and_language_are_checked_at_the_handshake(
    stack: Stack, params: dict[str, str], status: int, error: str
) -> None:
    client = await new_client(stack, languages=["en-US", "de-DE"])
    token = await new_token(stack, client, **params)
    status_seen, body, _ = await _refusal(
        url(stack, token, language="fr-FR" if "language" in params else "en-US")
    )
    assert (status_seen, body["error"]) == (status, error)


async def test_unknown_path_and_missing_token_are_refused_with_json(stack: Stack) -> None:
    status, body, _ = await _refusal(f"{stack.relay.url}/nowhere")
    assert (status, body["error"]) == (404, "not_found")
    status, body, _ = await _refusal(f"{stack.relay.url}/v1/listen")
    assert (status, body["error"]) == (401, "missing_token")


async def test_revocation_closes_a_live_stream_within_a_second(stack: Stack) -> None:
    client = await new_client(stack)
    token = await new_token(stack, client)
    async with connect(url(stack, token)) as ws:
        await ws.send(FRAME)
        started = time.monotonic()
        revoke = await asyncio.to_thread(
            stack.service.http.post, "/v1/revoke", auth=client, data={"token": token}
        )
        assert revoke.status_code == 200
        _, code, reason = await asyncio.wait_for(events_until_close(ws), 5)
    assert code == 1008
    assert reason == "token revoked"
    assert time.monotonic() - started < 1.0


async def test_a_revoked_signing_key_closes_its_streams_and_a_new_key_works_at_once(
    stack_factory: Any,
) -> None:
    """`speechgate keys revoke-signing`: both doors close the streams its tokens opened, its tokens
    are refused, and the new signer's tokens are accepted at once although this relay fetches the
    JWKS at most once a minute on an unknown kid: the reload event told it the keys changed."""
    stack: Stack = await asyncio.to_thread(stack_factory, idp_jwks_min_refresh_s=60.0)
    settings = Settings(
        redis_url=stack.service.settings.redis_url, redis_prefix=stack.service.settings.redis_prefix
    )
    cli = Cli(Deps(settings=settings, open_store=lambda _: stack.service.store), settings)
    client = await new_client(stack)
    token = await new_token(stack, client)
    leaked = jwt.get_unverified_header(token)["kid"]
    azure_door = f"{stack.relay.url}/speech/recognition/conversation/cognitiveservices/v1?language=en-US"
    async with (
        connect(url(stack, token)) as plain,
        connect(azure_door, additional_headers={"Authorization": f"Bearer {token}"}) as azure,
    ):
        await plain.send(FRAME)
        await asyncio.to_thread(cli, "keys", "revoke-signing", "--kid", leaked, "--yes")
        _, plain_code, plain_reason = await asyncio.wait_for(events_until_close(plain), 1.0)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(azure.recv(), 1.0)
    assert (plain_code, plain_reason) == (1008, "signing key revoked")
    assert (azure.close_code, azure.close_reason) == (4000, "signing key revoked")
    status, body, _ = await _refusal(url(stack, token))
    assert (status, body["error"]) == (401, "token_revoked")
    assert "get a new token" in body["message"]

    def published_kids() -> set[str]:
        return {k["kid"] for k in stack.service.http.get("/.well-known/jwks.json").json()["keys"]}

    assert await asyncio.to_thread(wait_until, lambda: leaked not in published_kids())
    fresh = await new_token(stack, client)
    assert jwt.get_unverified_header(fresh)["kid"] in published_kids()
    async with connect(url(stack, fresh)) as ws:
        await ws.send(FRAME)
        await ws.send(json.dumps({"type": "end"}))
        events, code, _ = await events_until_close(ws)
    assert code == 1000
    assert [e["type"] for e in events][-1] == "final"


async def test_a_relay_that_missed_the_event_refuses_a_revoked_signing_key_from_redis(
    stack: Stack, sync_redis: redis.Redis
) -> None:
    token = await new_token(stack, await new_client(stack))
    kid = jwt.get_unverified_header(token)["kid"]
    # What `keys revoke-signing` leaves in Redis, without the event this relay would have heard.
    sync_redis.sadd(Keyspace(stack.service.settings.redis_prefix).revoked_signing_keys, kid)
    status, body, _ = await _refusal(url(stack, token))
    assert (status, body["error"], body["message"]) == (401, "token_revoked", "signing key revoked")


async def test_daily_audio_quota_closes_the_stream_with_4429(stack: Stack) -> None:
    client = await new_client(stack, audio_s_per_day_subject=1)
    async with connect(url(stack, await new_token(stack, client))) as ws:
        for _ in range(15):  # 1.5 s of audio
            await ws.send(FRAME)
        _, code, reason = await asyncio.wait_for(events_until_close(ws), 5)
    assert code == 4429
    assert "quota" in reason
    status, body, headers = await _refusal(
        url(stack, await new_token(stack, client))
    )  # and no new stream today
    assert (status, body["error"]) == (429, "audio_quota")
    assert int(headers["Retry-After"]) <= 86401


async def test_session_time_limit_closes_with_4000(stack: Stack) -> None:
    client = await new_client(stack, max_session_s=1)
    async with connect(url(stack, await new_token(stack, client))) as ws:
        await ws.send(FRAME)
        _, code, reason = await asyncio.wait_for(events_until_close(ws), 5)
    assert code == 4000
    assert "session time limit" in reason


async def test_a_rotated_speech_key_is_picked_up_without_a_restart(stack: Stack) -> None:
    from speechgate.core.speechkeys import SPEECH_KEY_SECRET

    token = await new_token(stack, await new_client(stack))
    async with connect(url(stack, token)) as ws:  # the relay now holds the first key
        await ws.send(json.dumps({"type": "end"}))
        await events_until_close(ws)
    # Rotation: Azure accepts only the new key from now on; the store holds it as the newest version.
    new_key = "f" * 32
    await stack.service.store.set(SPEECH_KEY_SECRET, new_key, tags={"slot": "key2"})
    stack.fake.key = new_key
    async with connect(url(stack, token)) as ws:  # Azure's 401 makes the relay read the key again
        await ws.send(FRAME)
        await ws.send(json.dumps({"type": "end"}))
        events, code, _ = await events_until_close(ws)
    assert code == 1000
    assert [e["type"] for e in events if e["type"] == "final"] == ["final"]
    assert stack.fake.handshakes[-1]["headers"]["Ocp-Apim-Subscription-Key"] == new_key


async def test_relay_metrics_show_streams_refusals_and_audio(stack: Stack) -> None:
    import httpx

    client = await new_client(stack)
    async with connect(url(stack, await new_token(stack, client))) as ws:
        for _ in range(10):
            await ws.send(FRAME)
        await ws.send(json.dumps({"type": "end"}))
        await events_until_close(ws)
    await _refusal(f"{stack.relay.url}/v1/listen")
    async with httpx.AsyncClient() as http:
        deadline = time.monotonic() + 5
        while True:  # the stream's figures are booked as its handler finishes, just after the close
            text = (await http.get(f"http://127.0.0.1:{stack.relay.port}/metrics")).text
            if 'speechgate_relay_active_streams{door="plain"} 0.0' in text or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    assert 'speechgate_relay_refusals_total{reason="missing_token"} 1.0' in text
    audio = re.search(rf'speechgate_relay_audio_seconds_total{{client="{client[0]}"}} (\S+)', text)
    assert audio is not None
    assert float(audio.group(1)) == pytest.approx(1.0)  # ten frames of 100 ms
    assert 'speechgate_relay_active_streams{door="plain"} 0.0' in text
    assert "speechgate_relay_upstream_connect_seconds_count 1.0" in text


async def test_drain_lets_the_turn_finish_then_closes_with_1001(stack: Stack) -> None:
    from speechgate.relay import usp

    token = await new_token(stack, await new_client(stack))
    azure_url = f"{stack.relay.url}/speech/recognition/conversation/cognitiveservices/v1?language=en-US"
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        connect(azure_url, additional_headers=headers) as mid_turn,
        connect(azure_url, additional_headers=headers) as idle,
    ):
        request_id = usp.new_request_id()
        await mid_turn.send(usp.encode_text("speech.context", request_id, {}))
        await mid_turn.send(usp.encode_binary("audio", request_id, usp.riff_header(), "audio/x-wav"))
        await mid_turn.send(usp.encode_binary("audio", request_id, FRAME))
        assert usp.parse_text(str(await mid_turn.recv())).path == "turn.start"
        assert stack.relay.loop is not None
        drained = asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(stack.relay.relay.drain(), stack.relay.loop)
        )
        with contextlib.suppress(ConnectionClosed):
            await idle.recv()
        assert idle.close_code == 1001  # nothing in flight: closed at once
        status, body, _ = await _refusal(azure_url)
        assert (status, body["error"]) == (503, "draining")
        await mid_turn.send(usp.encode_binary("audio", request_id, b""))  # end of audio: the turn ends
        paths = []
        with contextlib.suppress(ConnectionClosed):
            async for message in mid_turn:
                paths.append(usp.parse_text(str(message)).path)
        assert paths[-1] == "turn.end"  # the turn finished...
        assert mid_turn.close_code == 1001  # ...then the stream was closed for a reconnect elsewhere
        await asyncio.wait_for(drained, 10)


async def test_token_in_the_query_as_the_javascript_sdk_sends_it_is_read_and_never_forwarded(
    stack: Stack,
) -> None:
    from urllib.parse import quote

    from speechgate.relay import usp

    token = await new_token(stack, await new_client(stack))
    target = (
        f"{stack.relay.url}/speech/recognition/conversation/cognitiveservices/v1?language=en-US"
        f"&format=simple&Authorization={quote('Bearer ' + token)}&X-ConnectionId=ABC123"
    )
    async with connect(target) as ws:
        request_id = usp.new_request_id()
        await ws.send(usp.encode_text("speech.context", request_id, {}))
        await ws.send(usp.encode_binary("audio", request_id, b""))
        assert usp.parse_text(str(await ws.recv())).path == "turn.start"
    upstream_path = stack.fake.handshakes[-1]["path"]
    assert "Authorization" not in upstream_path
    assert token not in upstream_path
    assert "language=en-US" in upstream_path
    assert "X-ConnectionId=ABC123" in upstream_path


async def test_azure_ending_the_connection_goes_unnoticed_on_the_plain_door(stack: Stack) -> None:
    stack.fake.close_after_s = 0.7  # as Azure does after about 10 minutes
    token = await new_token(stack, await new_client(stack))
    async with connect(url(stack, token)) as ws:
        for _ in range(25):  # 2.5 s of microphone audio, in real time
            await ws.send(FRAME)
            await asyncio.sleep(0.1)
        await ws.send(json.dumps({"type": "end"}))
        events, code, _ = await events_until_close(ws)
    assert code == 1000
    assert stack.fake.connections >= 3  # the recognition crossed at least two upstream closes
    finals = [e for e in events if e["type"] == "final"]
    assert finals
    offsets = [e["offset_ms"] for e in finals]
    assert offsets == sorted(offsets)  # one time line for the app, whatever the connections
    assert stack.fake.audio_bytes >= 25 * len(FRAME)  # nothing lost (replayed audio may count twice)


@pytest.mark.parametrize(("azure_code", "connections"), [(1008, 1), (1011, 3)])
async def test_azure_refusing_the_recognition_ends_it_with_azures_reason_not_a_reconnect_loop(
    stack: Stack, azure_code: int, connections: int
) -> None:
    """A refusal (1008 here) is not tried again; a connection that Azure keeps closing at once
    without a result (1011 here) is tried three times in all."""
    stack.fake.close_mid_turn = azure_code
    token = await new_token(stack, await new_client(stack))
    async with connect(url(stack, token)) as ws:
        for _ in range(3):
            await ws.send(FRAME)
        _, code, reason = await asyncio.wait_for(events_until_close(ws), 10)
    assert (code, reason) == (1011, "Azure Speech closed the connection: closed by the fake mid-turn")
    assert stack.fake.connections == connections


async def test_no_token_or_key_reaches_the_logs_even_at_debug(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = await new_token(stack, await new_client(stack))
    async with connect(url(stack, token)) as ws:  # the token rides in the query
        await ws.send(FRAME)
        await ws.send(json.dumps({"type": "end"}))
        await events_until_close(ws)
    await _refusal(url(stack, token[:-4] + "AAAA"))  # a refused one is logged too

    def stream_logged() -> bool:  # the relay logs a stream once its handler is done
        return any(getattr(r, "fields", {}).get("event") == "stream" for r in list(caplog.records))

    assert await asyncio.to_thread(wait_until, stream_logged)
    # Everything but this test's own client and the fake Azure, which log what they send and get.
    ours = [r for r in caplog.records if r.name not in ("websockets.client", "websockets.server")]
    logged = "\n".join(JsonFormatter().format(r) for r in ours)  # as production writes them
    lines = [json.loads(line) for line in logged.splitlines()]
    (refused,) = [line for line in lines if line.get("event") == "refused"]
    assert (refused["path"], refused["status"], refused["reason"]) == ("/v1/listen", 401, "invalid_token")
    (ended,) = [line for line in lines if line.get("event") == "stream"]
    assert (ended["door"], ended["close_code"], ended["outcome"]) == ("plain", 1000, "done")
    assert ended["audio_s"] == 0.1
    for secret in (token, token.split(".")[2], KEY):
        assert secret not in logged


def tone(seconds: float) -> bytes:
    """A 440 Hz tone at 16 kHz: audio the Opus encoder has something to code."""
    samples = (int(8000 * math.sin(2 * math.pi * 440 * i / 16000)) for i in range(int(16000 * seconds)))
    return array.array("h", samples).tobytes()


@pytest.mark.parametrize("container", ["ogg", "webm"])
@pytest.mark.parametrize("reconnects", [False, True])
async def test_opus_is_decoded_on_the_audio_time_line_across_azure_reconnects(
    stack: Stack, container: str, reconnects: bool
) -> None:
    """What reaches Azure is the decoded 16 kHz PCM (its length within one Opus frame of the
    recording's), and the app's offsets stay on that audio's time line, also while Azure closes
    the connection under it, as they do for PCM."""
    if reconnects:
        stack.fake.close_after_s = 0.7
    recording = tone(2.5)
    encoded = encode_opus(recording, container)
    token = await new_token(stack, await new_client(stack))
    target = url(stack, token).replace("format=pcm16k", f"format={container}-opus")
    chunk = len(encoded) // 10  # 250 ms of audio, cut wherever the bytes fall
    async with connect(target) as ws:
        for at in range(0, len(encoded), chunk):
            await ws.send(encoded[at : at + chunk])
            await asyncio.sleep(0.25)
        await ws.send(json.dumps({"type": "end"}))
        events, code, _ = await events_until_close(ws)
    assert code == 1000
    offsets = [e["offset_ms"] for e in events if e["type"] == "final"]
    if reconnects:
        assert stack.fake.connections >= 3
        assert offsets == sorted(offsets)
        assert offsets[0] == 0
        # replayed audio may count twice, but never less than the recording reaches Azure
        assert stack.fake.audio_bytes >= len(recording) - 640
    else:
        assert offsets == [0, 1000, 2000]  # one final per second heard, and the last
        assert abs(stack.fake.audio_bytes - len(recording)) <= 640
