"""One reading of every message the app sends on the Azure door: the splice and the message path
apply the same rules to the same bytes, however the app's WebSocket library fragments them
(websockets, a third-party client, sends each message in the fragments given), and what two
readers of a USP message could read differently is refused rather than chosen between."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from speechgate.relay import usp
from tests.support.relays import Stack

RECOGNITION = "/speech/recognition/conversation/cognitiveservices/v1?language=en-US"
TRANSLATION = "/speech/translation/cognitiveservices/v1?from=en-US&to=de"


@pytest.fixture(params=[True, False], ids=["splice", "message-path"])
def either_path(request: pytest.FixtureRequest, stack_factory: Any) -> Stack:
    stack: Stack = stack_factory(splice=request.param)
    return stack


def wav(rate: int, channels: int) -> bytes:
    return usp.riff_header(rate, 16, channels)


async def open_door(stack: Stack, path: str = RECOGNITION, **client: Any) -> ClientConnection:
    token = await asyncio.to_thread(stack.token, await asyncio.to_thread(stack.service.add_client, **client))
    return await connect(
        stack.relay.url + path, additional_headers={"Authorization": f"Bearer {token}"}, max_size=2**20
    )


async def turn(ws: ClientConnection, *audio: bytes | list[bytes]) -> list[str]:
    """One recognition turn: its context, the audio messages (a list: one message in fragments),
    the end of audio; the paths Azure answered with, to its turn.end."""
    request_id = usp.new_request_id()
    await ws.send(usp.encode_text("speech.context", request_id, {"phraseDetection": {"language": "en-US"}}))
    for each in audio:
        await ws.send(each)
    await ws.send(usp.encode_binary("audio", request_id, b""))
    paths: list[str] = []
    async for message in ws:
        if isinstance(message, str):
            paths.append(usp.parse_text(message).path)
            if paths[-1] == "turn.end":
                break
    return paths


def metered(stack: Stack) -> float:
    (live,) = stack.relay.relay.live.values()
    return live.stream.total_audio_s


def split(message: bytes, *cuts: int) -> list[bytes]:
    bounds = (0, *cuts, len(message))
    return [message[a:b] for a, b in itertools.pairwise(bounds)]


async def test_a_turns_wav_header_is_read_wherever_its_message_is_cut(either_path: Stack) -> None:
    """A turn declaring 48 kHz and 8 channels meters 24 times faster than 16 kHz mono. The next
    turn's own header must set the rate again, whichever fragment it arrives in: once it did not
    when it came in a second fragment (the splice kept the earlier rate: 60 s metered as 2.5 s)."""
    stack = either_path
    request_id = usp.new_request_id()
    fast = usp.encode_binary("audio", request_id, wav(48000, 8) + b"\1" * 38_400)  # 0.05 s
    slow = usp.encode_binary("audio", request_id, wav(16000, 1) + b"\1" * 3_200)  # 0.1 s
    head_end = 2 + int.from_bytes(slow[:2], "big")
    cuts: list[tuple[int, ...]] = [(cut,) for cut in range(head_end - 2, head_end + 46)]
    cuts += [(1, head_end), (head_end - 1, head_end + 3), (head_end + 1, head_end + 43), (2, head_end + 44)]
    async with await open_door(stack) as ws:
        for n, at in enumerate(cuts):
            assert "turn.end" in await turn(ws, fast)
            before = metered(stack)
            assert "turn.end" in await turn(ws, split(slow, *at))
            assert metered(stack) - before == pytest.approx(0.1, abs=1e-9), at
            assert metered(stack) == pytest.approx(0.15 * (n + 1), abs=1e-9)
    assert stack.fake.wav_rates == [48000, 16000] * len(cuts)  # and Azure heard each as sent
    assert stack.fake.audio_bytes == (38_400 + 3_200) * len(cuts)


@pytest.mark.parametrize(
    ("payload", "complaint"),
    [
        (
            wav(
                16000,
                1,
            )[:4]
            + b"\0" * 40
            + b"\1" * 3200,
            "WAV header",
        ),  # RIFF, then no WAVE
        (usp.riff_header(16000, 8, 1) + b"\1" * 3200, "8-bit"),
    ],
    ids=["not-wav", "8-bit"],
)
async def test_a_wav_header_the_relay_cannot_meter_by_is_refused_in_any_fragment(
    either_path: Stack, payload: bytes, complaint: str
) -> None:
    stack = either_path
    message = usp.encode_binary("audio", usp.new_request_id(), payload)
    head_end = 2 + int.from_bytes(message[:2], "big")
    for cut in (head_end - 1, head_end, head_end + 2, head_end + 20, head_end + 43):
        async with await open_door(stack) as ws:
            with contextlib.suppress(ConnectionClosed):
                await turn(ws, split(message, cut))
        assert ws.close_code == 1007, cut
        assert complaint in (ws.close_reason or "")
    assert stack.fake.audio_bytes == 0  # nothing of it reached Azure


@pytest.mark.parametrize(
    "message",
    [
        "Path:speech.config\r\nPath:speech.context\r\nX-RequestId:{rid}\r\n\r\n{body}",
        "Path:speech.context\r\nX-RequestId:{rid}\r\npath:speech.config\r\n\r\n{body}",
        "\r\n\r\nPath:speech.context\r\nX-RequestId:{rid}\r\n\r\n{body}",
        "Path:telemetry\nPath:speech.context\r\nX-RequestId:{rid}\r\n\r\n{body}",
        "Path:speech.context\r\nX-RequestId:{rid}\r\nContent Type:x\r\n\r\n{body}",
    ],
    ids=["two-paths", "two-paths-any-case", "leading-blank-line", "lone-lf", "bad-header-name"],
)
@pytest.mark.parametrize("fragments", [1, 3], ids=["whole", "fragmented"])
async def test_a_text_message_two_readers_would_read_differently_is_refused(
    either_path: Stack, message: str, fragments: int
) -> None:
    """Each once slipped a language the token does not allow past the checks (which read one
    Path, or none) while the turn watch read another."""
    stack = either_path
    body = '{"phraseDetection":{"language":"de-DE"}}'
    text = message.replace("{rid}", usp.new_request_id()).replace("{body}", body)
    size = len(text) // fragments + 1
    async with await open_door(stack, languages=["en-US"]) as ws:
        await ws.send(text if fragments == 1 else [text[i : i + size] for i in range(0, len(text), size)])
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 4000  # both SDKs cancel at once and show the reason
    assert "cannot be checked" in (ws.close_reason or "")
    assert not any("de-DE" in received for received in stack.fake.texts)  # none of it reached Azure


@pytest.mark.parametrize("fragments", [1, 2, 7], ids=["whole", "two", "seven"])
async def test_a_text_message_in_fragments_is_checked_whole_and_then_forwarded(
    either_path: Stack, fragments: int
) -> None:
    stack = either_path
    allowed = usp.encode_text(
        "speech.context", usp.new_request_id(), {"phraseDetection": {"language": "en-US"}}
    )
    refused = usp.encode_text(
        "speech.context", usp.new_request_id(), {"phraseDetection": {"language": "de-DE"}}
    )
    size = len(allowed) // fragments + 1
    async with await open_door(stack, languages=["en-US"]) as ws:
        request_id = usp.parse_text(allowed).request_id
        await ws.send([allowed[i : i + size] for i in range(0, len(allowed), size)])
        await ws.send(usp.encode_binary("audio", request_id, wav(16000, 1) + b"\1" * 3200))
        await ws.send(usp.encode_binary("audio", request_id, b""))
        async for message in ws:  # the turn went through
            if isinstance(message, str) and usp.parse_text(message).path == "turn.end":
                break
        await ws.send([refused[i : i + size] for i in range(0, len(refused), size)])
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass
    assert ws.close_code == 4000
    assert "de-DE" in (ws.close_reason or "")
    assert stack.fake.texts == [allowed]  # the allowed one whole, as sent; nothing of the other
    assert stack.fake.audio_bytes == 3200


async def test_translation_targets_in_speech_context_hold_for_a_token_of_any_language(stack: Stack) -> None:
    """The SDK names v1 translation's targets in speech.context too: the client's limit holds there
    for a token that allows every language, as it does in the query."""
    fields = {"scopes": ["speech:translate"], "max_translation_targets": 2}
    context = {
        "phraseDetection": {"language": "en-US"},
        "translation": {"targetLanguages": ["de", "fr", "it"]},
    }
    async with await open_door(stack, TRANSLATION, **fields) as ws:
        await ws.send(usp.encode_text("speech.context", usp.new_request_id(), context))
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 4000
    assert "3 translation targets; this app's client allows 2" in (ws.close_reason or "")
    assert not stack.fake.contexts
