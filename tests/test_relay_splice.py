"""The Azure door's splice (speechgate/relay/splice.py and frames.py): frames forwarded as bytes, metered
by peeking, control frames and protocol errors handled on their own leg."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from speechgate.relay import frames, usp
from speechgate.relay.splice import WRITE_HIGH, Splice, azure_closed
from tests.support.processes import wait_until
from tests.support.relays import Stack

RECOGNITION = "/speech/recognition/conversation/cognitiveservices/v1?language=en-US"
SYNTHESIS = "/cognitiveservices/websocket/v1"
AUDIO = b"\x01\x02" * 1600  # 100 ms


def context(request_id: str) -> str:
    return usp.encode_text("speech.context", request_id, {"phraseDetection": {"language": "en-us"}})


def audio(request_id: str, payload: bytes) -> bytes:
    return usp.encode_binary("audio", request_id, payload, extra={"X-StreamId": "1"})


async def open_stream(stack: Stack, token: str) -> ClientConnection:
    return await connect(
        stack.relay.url + RECOGNITION, additional_headers={"Authorization": f"Bearer {token}"}, max_size=2**20
    )


async def until_turn_end(ws: ClientConnection) -> list[str]:
    paths = []
    async for message in ws:
        if isinstance(message, str):
            paths.append(usp.parse_text(message).path)
            if paths[-1] == "turn.end":
                return paths
    return paths


def spliced(stack: Stack) -> list[Any]:
    return [live.splice for live in stack.relay.relay.live.values()]


async def test_frames_pass_through_unchanged_and_the_audio_is_metered(stack: Stack) -> None:
    token = await asyncio.to_thread(stack.token, await asyncio.to_thread(stack.service.add_client))
    request_id = usp.new_request_id()
    async with await open_stream(stack, token) as ws:
        await ws.send(context(request_id))
        await ws.send(audio(request_id, usp.riff_header() + AUDIO))  # a turn starts with a WAV header
        for _ in range(9):
            await ws.send(audio(request_id, AUDIO))
        await ws.send([audio(request_id, AUDIO[:1000]), AUDIO[1000:]])  # one message in two frames
        await ws.send(audio(request_id, b""))  # end of audio
        paths = await until_turn_end(ws)
        (splice,) = spliced(stack)
        assert isinstance(splice, Splice)
        assert splice.live.stream.total_audio_s == pytest.approx(1.1)  # headers and WAV header not counted
    assert paths[0] == "turn.start"
    assert "speech.phrase" in paths
    assert stack.fake.audio_bytes == 11 * len(AUDIO)  # every byte reached Azure, reassembled there


async def test_pings_are_answered_by_the_relay(stack: Stack) -> None:
    token = await asyncio.to_thread(stack.token, await asyncio.to_thread(stack.service.add_client))
    async with await open_stream(stack, token) as ws:
        latency = await asyncio.wait_for(await ws.ping(b"are you there"), 5)
        assert latency >= 0
        assert spliced(stack)


async def test_a_frame_over_the_limit_closes_with_1009(stack: Stack) -> None:
    token = await asyncio.to_thread(stack.token, await asyncio.to_thread(stack.service.add_client))
    async with await open_stream(stack, token) as ws:
        await ws.send(b"\0" * (stack.relay.relay.settings.max_frame_bytes + 1))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 1009


async def test_azure_closing_mid_turn_becomes_1011_never_1000(stack: Stack) -> None:
    stack.fake.close_mid_turn = 1000
    token = await asyncio.to_thread(stack.token, await asyncio.to_thread(stack.service.add_client))
    request_id = usp.new_request_id()
    async with await open_stream(stack, token) as ws:
        await ws.send(context(request_id))
        await ws.send(audio(request_id, usp.riff_header() + AUDIO))
        with pytest.raises(ConnectionClosed):  # before any turn.end
            await asyncio.wait_for(until_turn_end(ws), 10)
    assert ws.close_code == 1011


def raw_handshake(
    stack: Stack, token: str, path: str = RECOGNITION, receive_buffer: int | None = None
) -> socket.socket:
    """A WebSocket client by hand, to send what a library would refuse to."""
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", stack.relay.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(4096)
    assert response.startswith(b"HTTP/1.1 101")
    return sock


def received_frames(sock: socket.socket) -> list[tuple[int, int | None]]:
    """Every frame until the relay closes the socket: (opcode, close code or None)."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    found, offset = [], 0
    while (header := frames.parse_header(data, offset, 2**20)) is not None:
        code = struct.unpack_from(">H", data, header.start)[0] if header.opcode == frames.CLOSE else None
        found.append((header.opcode, code))
        offset = header.end
    return found


def read_close(sock: socket.socket) -> int | None:
    ((opcode, code),) = received_frames(sock)
    assert opcode == frames.CLOSE
    return code


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (bytes([0x82, 4]) + b"abcd", 1002),  # unmasked, from a client
        (bytes([0xC2, 0x84]) + b"\0\0\0\0abcd", 1002),  # a reserved bit: no extension was agreed
        (bytes([0x83, 0x84]) + b"\0\0\0\0abcd", 1002),  # opcode 3 does not exist
    ],
    ids=["unmasked", "reserved-bit", "unknown-opcode"],
)
def test_protocol_errors_close_the_stream_with_1002(stack: Stack, frame: bytes, code: int) -> None:
    token = stack.token(stack.service.add_client())
    with raw_handshake(stack, token) as sock:
        sock.sendall(frame)
        assert read_close(sock) == code


def test_the_splice_can_be_turned_off(stack_factory: Any) -> None:
    stack: Stack = stack_factory(splice=False)
    token = stack.token(stack.service.add_client())

    async def one_turn() -> tuple[list[str], list[Any]]:
        request_id = usp.new_request_id()
        async with await open_stream(stack, token) as ws:
            await ws.send(context(request_id))
            await ws.send(audio(request_id, usp.riff_header() + AUDIO))
            await ws.send(audio(request_id, b""))
            return await until_turn_end(ws), spliced(stack)

    paths, splices = asyncio.run(one_turn())
    assert paths[-1] == "turn.end"
    assert splices == [None]


def test_an_app_that_stops_answering_is_closed_and_one_that_answers_stays(stack_factory: Any) -> None:
    stack: Stack = stack_factory(keepalive_s=0.3)
    client = stack.service.add_client()

    async def answering() -> bool:  # websockets answers pings by itself
        async with await open_stream(stack, stack.token(client)) as ws:
            await asyncio.sleep(1.5)  # five keepalive periods
            return ws.close_code is None

    assert asyncio.run(answering())
    with raw_handshake(stack, stack.token(client)) as sock:  # this one never answers
        assert received_frames(sock) == [(frames.PING, None), (frames.CLOSE, 1011)]


def test_a_silent_app_is_found_within_twice_the_keepalive(stack_factory: Any) -> None:
    """A phone that lost its network sends nothing and answers nothing: it is pinged once it has
    been quiet for up to one keepalive period and closed one period after that, never later."""
    keepalive = 0.5
    stack: Stack = stack_factory(keepalive_s=keepalive)
    with raw_handshake(stack, stack.token(stack.service.add_client())) as sock:
        hello = usp.encode_text("speech.context", usp.new_request_id(), {}).encode()
        sock.sendall(frames.encode(frames.TEXT, hello, masked=True))
        spoke = time.monotonic()
        data, offset, close_code = b"", 0, None
        while close_code is None and (chunk := sock.recv(4096)):
            data += chunk
            while (header := frames.parse_header(data, offset, 2**20)) is not None and header.end <= len(
                data
            ):
                if header.opcode == frames.CLOSE:
                    close_code = struct.unpack_from(">H", data, header.start)[0]
                offset = header.end
        quiet_for = time.monotonic() - spoke
        assert close_code == 1011
    assert keepalive <= quiet_for <= 2 * keepalive + 0.3  # timers run late on a busy machine; 3x was 1.5


def kernel_buffering() -> int:
    """The most the kernel can hold between the fake and a stalled app: the relay's receive buffer
    from Azure plus the two send buffers (relay to app, fake to relay), at their autotuning limits.
    These differ per machine: 6 MB receive on some, 32 MB on others."""
    receive = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    send = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return receive + 2 * send


def test_an_app_that_stops_reading_holds_azure_back_and_loses_nothing(stack: Stack) -> None:
    """Backpressure: a full write buffer toward the app pauses reading from Azure, so the relay
    holds a bounded amount (the kernels' socket buffers hold the rest, then Azure waits); when the
    app reads again, every byte arrives."""
    # A quarter more audio than the kernels and the relay can hold, so Azure must be held back.
    total = (kernel_buffering() + WRITE_HIGH + 256 * 1024) * 5 // 4 // 3200 + 1
    stack.fake.synthesis_frames = total
    token = stack.token(stack.service.add_client())
    request_id = usp.new_request_id()
    with raw_handshake(stack, token, SYNTHESIS, receive_buffer=16384) as sock:
        ssml = usp.encode_text("ssml", request_id, "<speak>hello</speak>", "application/ssml+xml")
        sock.sendall(frames.encode(frames.TEXT, ssml.encode(), masked=True))
        sent: list[int] = []

        def stalled() -> bool:  # Azure can send no more while nobody reads
            sent.append(stack.fake.synthesis_sent)
            return len(sent) > 5 and sent[-1] == sent[-6] > 0

        assert wait_until(stalled, timeout=30, interval=0.1)
        assert sent[-1] < total
        (splice,) = spliced(stack)
        assert not splice.azure.transport.is_reading()  # the relay stopped taking from Azure
        # It holds little: the high-water mark, plus at most the one chunk (an asyncio read is at
        # most 256 KiB) that was being forwarded when the mark was passed.
        assert splice.app.transport.get_write_buffer_size() <= WRITE_HIGH + 256 * 1024
        data, audio_frames = b"", 0
        while True:
            data += sock.recv(2**16)
            offset = 0
            while (header := frames.parse_header(data, offset, 2**20)) is not None and header.end <= len(
                data
            ):
                if header.opcode == frames.BINARY:
                    audio_frames += 1
                elif b"Path:turn.end" in data[header.start : header.end]:
                    assert audio_frames == total
                    return
                offset = header.end
            data = data[offset:]


@pytest.mark.parametrize(
    ("azure_code", "in_turn", "app_code"),
    [
        (1000, False, 1000),  # between turns: the SDK reconnects by itself
        (1001, False, 1001),
        (1000, True, 1011),  # never 1000 mid-turn: the SDKs would hang
        (1008, False, 1011),
        (1006, True, 1011),  # dropped
        (1007, True, 1007),  # Azure refused the request: the SDKs cancel at once with its reason
    ],
)
def test_what_the_app_hears_when_azure_closes(azure_code: int, in_turn: bool, app_code: int) -> None:
    code, reason = azure_closed(azure_code, "Unsupported voice.", in_turn)
    assert (code, reason) == (app_code, "Azure Speech closed the connection: Unsupported voice.")


def test_azures_reason_is_cut_to_fit_a_close_frame_and_stays_utf8() -> None:
    _, reason = azure_closed(1007, "voix « inconnue » " * 20, True)
    assert len(reason.encode("utf-8")) <= 123
    assert reason.startswith("Azure Speech closed the connection: voix « inconnue »")
    assert azure_closed(1011, "", True) == (1011, "Azure Speech closed the connection")
