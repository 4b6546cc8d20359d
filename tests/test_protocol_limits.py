"""The token's and the client's limits inside the protocol: what the app says in WAV headers,
queries, paths and USP messages cannot get past them, on both doors and both data paths."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any

import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from relay import usp
from tests.processes import wait_until
from tests.relays import Stack
from token_service.keyspace import Keyspace, day

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
