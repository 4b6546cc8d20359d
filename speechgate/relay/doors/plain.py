"""The plain door (`/v1/listen`): audio in (PCM, or Opus in Ogg or WebM), JSON events out; the
relay speaks USP to Azure for the app, and decodes Opus to 16 kHz PCM on the way (opus.py)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from speechgate.core.jose import loads_strict
from speechgate.relay import opus, usp
from speechgate.relay.auth import Refusal
from speechgate.relay.containers import ContainerError
from speechgate.relay.doors import connect, stop
from speechgate.relay.endpoints import CONVERSATION_PATH
from speechgate.relay.live import NOT_READING, Context, Live, Pending, upstream_hung
from speechgate.relay.splice import azure_closed
from speechgate.relay.upstream import UpstreamError, hung

PCM_FORMATS = ("pcm", "pcm16k")
PLAIN_FORMATS = (*PCM_FORMATS, *opus.FORMATS)
# What the first bytes of a container say it is: refused on a stream declared as PCM, never
# forwarded to Azure as if they were samples.
CONTAINERS = {b"OggS": "ogg-opus", b"\x1a\x45\xdf\xa3": "webm-opus"}


@dataclass(frozen=True, slots=True)
class PlainFormat:
    kind: str  # one of PLAIN_FORMATS
    sample_rate: int  # of the PCM sent to Azure

    @property
    def compressed(self) -> bool:
        return self.kind in opus.FORMATS


def plain_format(params: Sequence[tuple[str, str]]) -> PlainFormat:
    """The plain door's audio, from `format`: `pcm` (16-bit little-endian mono at `sample_rate`,
    16000 unless said), `pcm16k`, `ogg-opus` or `webm-opus` (Opus says its own rate); or a
    Refusal saying what it takes."""
    query = {k.lower(): v for k, v in params}
    kind = query.get("format", "pcm").lower()
    if kind not in PLAIN_FORMATS:
        raise Refusal(
            400,
            "unsupported_format",
            f"format {kind[:20]} is not supported here; send format=pcm (16-bit little-endian mono, "
            "with sample_rate), pcm16k, ogg-opus (Ogg/Opus) or webm-opus (what MediaRecorder records)",
        )
    if kind in opus.FORMATS:
        if "sample_rate" in query:
            raise Refusal(
                400, "unsupported_format", f"format={kind} carries its own rate; send no sample_rate"
            )
        return PlainFormat(kind, opus.OUTPUT_RATE)
    rate = query.get("sample_rate", "16000")
    if not (rate.isascii() and rate.isdigit()) or not 8000 <= int(rate) <= 48000:
        raise Refusal(400, "unsupported_format", "sample_rate must be whole Hz from 8000 to 48000")
    if kind == "pcm16k" and int(rate) != 16000:
        raise Refusal(400, "unsupported_format", "format=pcm16k is 16000 Hz; use format=pcm with sample_rate")
    return PlainFormat(kind, int(rate))


def speech_config(sample_rate: int) -> dict[str, Any]:
    source = {"type": "Stream", "samplerate": str(sample_rate), "bitspersample": "16", "channelcount": "1"}
    return {"context": {"system": {"name": "speechgate", "version": "1"}, "audio": {"source": source}}}


class _PlainUpstream:
    """The plain door's Azure side: one recognition over as many connections as Azure needs.

    Azure ends a connection after about 10 minutes. The app must not notice: the audio not yet
    covered by a final result is kept (bounded), and on a new connection it is sent again first;
    offsets from the new connection are shifted to stay on the app's time line.
    """

    # Audio kept until a final result covers it, to replay on a new connection: 16 s at 16 kHz.
    # Bounded in bytes whatever the rate, since it is what a stream may hold of the relay's memory.
    MAX_REPLAY_BYTES = 512 * 1024
    RECONNECT_CODES = frozenset({1000, 1001, 1006, 1011, 1012, 1013})  # gone, not refused
    SHORT_S = 5.0  # a connection Azure closed sooner than this, with no final result, made no headway
    MAX_FRUITLESS = 3  # such connections in a row, and the relay stops trying
    BACKOFF_S = 0.25  # before the n-th fruitless retry: this, doubled n - 1 times
    MAX_RECONNECTS, RECONNECT_WINDOW_S = 10, 600.0  # Azure itself ends one about every 10 minutes

    def __init__(self, relay: Context, live: Live, language: str, sample_rate: int) -> None:
        self.relay, self.live, self.language = relay, live, language
        self.sample_rate = sample_rate
        self.bytes_per_s = 2 * sample_rate
        self.chunks: collections.deque[tuple[int, bytes]] = collections.deque()  # (position, audio)
        self.buffered = 0
        self.position = 0  # audio bytes the app has sent
        self.base = 0  # where the current connection's audio starts, in the app's audio
        self.connection: ClientConnection | None = None
        self.request_id = ""
        self.ended = False
        self.opened = 0.0
        # Progress is a final result: partials come again for the same audio on every replay.
        self.finals = 0
        self.finals_before = 0  # as many when the current connection opened
        self.fruitless = 0  # connections in a row that made no headway
        self.reconnects: collections.deque[float] = collections.deque()  # when, in the last window

    async def connect(self) -> None:
        self.connection = None
        self.opened, self.finals_before = time.monotonic(), self.finals
        query = urlencode({"language": self.language, "format": "simple"})
        upstream = await connect(
            self.relay,
            self.live,
            "stt",
            lambda _: CONVERSATION_PATH,
            query,
            {"X-ConnectionId": usp.new_request_id()},
        )
        self.request_id = usp.new_request_id()
        self.base = self.chunks[0][0] if self.chunks else self.position
        await upstream.send(usp.encode_text(usp.SPEECH_CONFIG, None, speech_config(self.sample_rate)))
        await upstream.send(
            usp.encode_text(
                usp.SPEECH_CONTEXT,
                self.request_id,
                {"phraseDetection": {"language": self.language}, "audio": {"streams": {"1": None}}},
            )
        )
        await upstream.send(self._frame(usp.riff_header(self.sample_rate), "audio/x-wav"))
        for _, chunk in list(self.chunks):  # what Azure had not confirmed yet
            await upstream.send(self._frame(chunk))
        if self.ended:
            await upstream.send(self._frame(b""))
        self.connection = self.live.upstream = upstream

    def refused(self) -> str | None:
        """Azure closed the connection: why not to open another, or None to carry on. Not after
        a refusal (1007 bad request, 1008 policy, 4xxx), which would be refused again, nor after
        a few connections in a row that it closed soon without a final result, nor past
        MAX_RECONNECTS in RECONNECT_WINDOW_S (each new connection replays audio)."""
        assert self.connection is not None
        code, reason = self.connection.close_code or 1006, self.connection.close_reason or ""
        now = time.monotonic()
        quick = now - self.opened < self.SHORT_S
        self.fruitless = self.fruitless + 1 if quick and self.finals == self.finals_before else 0
        while self.reconnects and self.reconnects[0] < now - self.RECONNECT_WINDOW_S:
            self.reconnects.popleft()
        if len(self.reconnects) >= self.MAX_RECONNECTS:
            return f"{self.relay.upstream_name} keeps closing the connection; giving up"
        if code in self.RECONNECT_CODES and self.fruitless < self.MAX_FRUITLESS:
            self.reconnects.append(now)
            return None
        return azure_closed(code, reason, True, self.relay.upstream_name)[1]

    def backoff_s(self) -> float:
        """How long to wait before the next connection: none after one that made headway."""
        return self.BACKOFF_S * 2 ** (self.fruitless - 1) if self.fruitless else 0.0

    def _frame(self, payload: bytes, content_type: str | None = None) -> bytes:
        return usp.encode_binary(usp.AUDIO, self.request_id, payload, content_type, extra={"X-StreamId": "1"})

    async def send(self, chunk: bytes) -> None:
        self.chunks.append((self.position, chunk))
        self.position += len(chunk)
        self.buffered += len(chunk)
        while self.buffered > self.MAX_REPLAY_BYTES:  # bounded, whatever Azure does
            self.buffered -= len(self.chunks.popleft()[1])
        await self._send(self._frame(chunk))

    async def end(self) -> None:
        self.ended = True
        await self._send(self._frame(b""))

    async def _send(self, frame: bytes) -> None:
        if self.connection is not None:
            with contextlib.suppress(ConnectionClosed):  # replayed on the next connection
                await self.connection.send(frame)

    def event(self, kind: str, body: dict[str, Any]) -> str:
        if kind == "final":
            self.finals += 1
        shift = self.base * 1000 // self.bytes_per_s
        return json.dumps(
            {
                "type": kind,
                "text": body.get("DisplayText", body.get("Text", "")),
                "offset_ms": shift + usp.ms(body.get("Offset", 0)),
                "duration_ms": usp.ms(body.get("Duration", 0)),
            }
        )

    def confirmed(self, body: dict[str, Any]) -> None:
        """Audio up to the end of a final result never needs sending again."""
        end_ms = usp.ms(body.get("Offset", 0)) + usp.ms(body.get("Duration", 0))
        end = self.base + end_ms * self.bytes_per_s // 1000
        while self.chunks and self.chunks[0][0] + len(self.chunks[0][1]) <= end:
            self.buffered -= len(self.chunks.popleft()[1])


async def _deliver(relay: Context, live: Live, event: str) -> bool:
    """Send a result to the app; an app that has read nothing for a keepalive period while its
    socket is full is closed (1008), rather than the relay holding its audio and results."""
    try:
        async with asyncio.timeout(relay.settings.keepalive_s):  # no task of its own, as wait_for makes
            await live.connection.send(event)
    except TimeoutError:
        live.end(1008, 1008, NOT_READING)
        return False
    return True


async def _decoded(relay: Context, transcoder: opus.Transcoder, data: bytes) -> bytes:
    """The PCM of a chunk of Opus. A chunk of up to a second (what recorders send: 20 ms to
    250 ms) is read and decoded on the event loop, in well under a millisecond; a larger one in a
    worker, where the decoders let go of the GIL and the loop forwards other streams meanwhile.
    The hop to a worker and back cost more than decoding a 250-ms chunk (docs/benchmarks.md)."""
    loop = asyncio.get_running_loop()
    if len(data) > opus.INLINE_BYTES:
        return await loop.run_in_executor(relay.workers, transcoder.feed, data)
    packets = transcoder.read(data)
    if sum(map(opus.packet_ms, packets)) > opus.INLINE_MS:
        return await loop.run_in_executor(relay.workers, transcoder.decode, packets)
    return transcoder.decode(packets)


async def serve(relay: Context, live: Live, pending: Pending) -> None:
    params = dict((k.lower(), v) for k, v in pending.params)
    audio = plain_format(pending.params)  # checked at the handshake
    live.stream.byte_rate = 2 * audio.sample_rate
    transcoder = opus.Transcoder(audio.kind, relay.libopus) if audio.compressed else None
    azure = _PlainUpstream(relay, live, params.get("language", "en-US"), audio.sample_rate)
    try:
        await azure.connect()
    except UpstreamError as exc:
        live.end(1013, 1013, f"{relay.upstream_name} unavailable: {exc}")
        return
    stream, client = live.stream, live.connection
    live.in_turn = True
    opened = live.opened
    finished = asyncio.Event()

    async def app_to_azure() -> None:
        async for message in client:
            if type(message) is bytes:
                if transcoder is not None:
                    try:
                        message = await _decoded(relay, transcoder, message)
                    except ContainerError as exc:
                        live.end(1007, 1007, f"format={audio.kind}: {exc}")
                        return
                    if not message:  # a page or block not yet whole
                        continue
                elif stream.total_audio_s == 0 and message[:4] in CONTAINERS:
                    declared = CONTAINERS[message[:4]]
                    live.end(
                        1007,
                        1007,
                        f"this is {declared} audio, not PCM; open the stream with format={declared}",
                    )
                    return
                if stream.total_audio_s == 0:
                    live.turn_audio_at = time.perf_counter()
                stream.add_audio(len(message))
                if stream.flooding(opened):
                    live.end(1008, 1008, "audio sent much faster than real time")
                    return
                await azure.send(message)
                continue
            try:
                kind = loads_strict(message).get("type")
            except (ValueError, AttributeError):
                live.end(1007, 1007, 'text frames must be JSON such as {"type": "end"}')
                return
            if kind != "end":
                live.end(1003, 1003, f'unknown message type {kind!r}; send audio or {{"type": "end"}}')
                return
            await azure.end()
            await finished.wait()
            return

    async def from_azure() -> None:
        """One Azure connection's messages, until it closes (whatever its close code)."""
        assert azure.connection is not None
        while True:
            try:
                message = await azure.connection.recv()
            except ConnectionClosed:  # not only 1000: an error close raises rather than ends
                return
            if type(message) is not str:
                continue
            msg = usp.parse_text(message)
            if live.turn_audio_at is not None and msg.path in (usp.HYPOTHESIS, usp.PHRASE):
                relay.metrics.first_result.labels("plain").observe(time.perf_counter() - live.turn_audio_at)
                live.turn_audio_at = None
            if msg.path == usp.HYPOTHESIS:
                if not await _deliver(relay, live, azure.event("partial", msg.json())):
                    return
            elif msg.path == usp.PHRASE:
                body = msg.json()
                if body.get("RecognitionStatus") == "Success":
                    if not await _deliver(relay, live, azure.event("final", body)):
                        return
                    azure.confirmed(body)
            elif msg.path == usp.TURN_END:
                live.in_turn = False
                live.code = 1000
                finished.set()
                with contextlib.suppress(ConnectionClosed):
                    await client.close(1000, "done")
                return

    async def azure_to_app() -> None:
        while True:
            await from_azure()
            if finished.is_set():
                return
            if live.stream.closing_reason is not None:
                return
            assert azure.connection is not None
            if hung(azure.connection):  # not a close: an Azure that stopped answering
                await upstream_hung(relay, live)
            refusal = azure.refused()
            if refusal is not None:
                live.end(1011, 1011, refusal)
                return
            await asyncio.sleep(azure.backoff_s())
            try:  # Azure ended the connection mid-recognition: carry on over a new one
                await azure.connect()
            except UpstreamError as exc:
                live.end(1011, 1011, f"{relay.upstream_name} failed: {exc}")
                return

    tasks = [asyncio.ensure_future(app_to_azure()), asyncio.ensure_future(azure_to_app())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await stop(live, tasks, azure.connection)
