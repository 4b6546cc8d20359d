"""The two front doors: what flows between an app and Azure once a stream is admitted.

Close codes are chosen for how the clients react (shared/reference/azure-speech-websocket.md):
- Azure-compatible door: a turn that cannot finish ends with 4000 and a reason (both SDKs cancel
  at once and show it); never 1000 in the middle of a turn (the SDKs hang); 1001 when draining;
  an upstream that closes mid-turn becomes 1011, which the SDK answers by reconnecting and
  replaying the turn's audio, except Azure's own 1007 (it refused the request), passed on with
  its reason (splice.azure_closed).
- Plain door: 1000 done, 1001 draining, 1003/1007 a message it cannot use, 1008 revoked or too
  fast, 1009 frame too large, 1011 upstream failure (with Azure's reason when it refused),
  1013 upstream unavailable, 4000 session time limit, 4429 quota used up.

The Azure door's data phase normally runs on a splice of the two sockets (speechgate/relay/splice.py, the
same rules); the message-level pump here is its fallback and `SPEECHGATE_SPLICE=0`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Awaitable, Sequence
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from speechgate.core.jose import loads_strict
from speechgate.relay import usp
from speechgate.relay.auth import Refusal
from speechgate.relay.endpoints import CONVERSATION_PATH, upstream_path
from speechgate.relay.live import Context, Live, Pending
from speechgate.relay.splice import PATH_WINDOW, SAMPLE_MASK, Splice, azure_closed, can_take_over
from speechgate.relay.upstream import UpstreamError, open_upstream, upstream_url


def resume(connection: ServerConnection) -> None:
    """Reading was paused at the handshake, for the splice; this stream goes another way."""
    if connection.transport is not None:
        connection.transport.resume_reading()


async def _connect(
    relay: Context, service: str, path: str, query: str, extra: dict[str, str]
) -> ClientConnection:
    started = time.perf_counter()
    try:
        return await open_upstream(
            upstream_url(relay.settings, service, path, query),
            relay.credentials,
            extra,
            relay.settings.upstream_connect_attempts,
            max_size=2**20,
        )
    except UpstreamError:
        relay.metrics.upstream_failures.inc()
        raise
    finally:
        relay.metrics.upstream_connect.observe(time.perf_counter() - started)


async def _stop(live: Live, tasks: Sequence[asyncio.Future[None]], upstream: ClientConnection | None) -> None:
    """End both directions of a stream and its Azure connection; the stream is over."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await task
    if upstream is not None:
        with contextlib.suppress(ConnectionClosed):
            await upstream.close()
    live.ended.set()


async def _timed(relay: Context, direction: str, send: Awaitable[None]) -> None:
    started = time.perf_counter()
    await send
    relay.metrics.forward.labels(direction).observe(time.perf_counter() - started)


def _path(message: str) -> bytes | bytearray:
    return usp.peek_path(message[:PATH_WINDOW].encode())


# --- Azure-compatible: frames verbatim ----------------------------------------------------------


async def azure(relay: Context, live: Live, pending: Pending) -> None:
    request = live.connection.request
    assert request is not None
    extra = {k: v for k, v in request.headers.raw_items() if k.lower() in ("x-connectionid", "user-agent")}
    try:
        path = upstream_path(pending.endpoint, pending.path, bool(relay.settings.speech_endpoint))
        upstream = await _connect(relay, pending.endpoint.service, path, pending.query, extra)
    except UpstreamError as exc:
        resume(live.connection)
        live.end(4000, 1013, f"{relay.upstream_name} unavailable: {exc}")
        return
    live.upstream = upstream
    stream, client = live.stream, live.connection
    if relay.settings.splice and can_take_over(client) and can_take_over(upstream):
        # No await from the check to the takeover: no data can slip in between.
        live.splice = Splice(relay, live, client, upstream)
        live.splice.start()
        try:
            await live.splice.done
        finally:
            live.ended.set()
        return
    resume(client)
    opened = time.monotonic()

    async def app_to_azure() -> None:
        count = 0
        async for message in client:
            if type(message) is bytes:
                size = usp.audio_payload_size(message)
                if size:
                    start = len(message) - size
                    if message[start : start + 4] == b"RIFF":  # the first frame of a turn: a WAV header
                        if not live.wav_header(message[start:]):
                            return
                        size = max(0, size - 44)
                    stream.add_audio(size)
                    if stream.flooding(opened):
                        live.end(4000, 1008, "audio sent much faster than real time")
                        return
            elif isinstance(message, str) and not live.app_text(_path(message), message.encode):
                return
            count += 1
            if count & SAMPLE_MASK:
                await upstream.send(message)
            else:
                await _timed(relay, "up", upstream.send(message))
            if live.drain_timer is not None and isinstance(message, str) and _path(message) == b"telemetry":
                live.drained()  # the app's last word on its turn has gone to Azure

    async def azure_to_app() -> None:
        async for message in upstream:
            await client.send(message)
            if type(message) is str:
                path = _path(message)
                if live.turn_audio_at is not None and path in usp.RESULTS:
                    relay.metrics.first_result.labels("azure").observe(
                        time.perf_counter() - live.turn_audio_at
                    )
                    live.turn_audio_at = None
                if path == usp.TURN_END_BYTES:
                    live.turn_ended()

    await _pump(relay, live, app_to_azure(), azure_to_app(), upstream)


async def _pump(relay: Context, live: Live, outgoing: Any, incoming: Any, upstream: ClientConnection) -> None:
    tasks = [asyncio.ensure_future(outgoing), asyncio.ensure_future(incoming)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if live.stream.closing_reason is None:
            if tasks[1] in done and live.connection.close_code is None:
                code, reason = azure_closed(
                    upstream.close_code or 1006,
                    upstream.close_reason or "",
                    live.in_turn,
                    relay.upstream_name,
                )
                live.code = code
                with contextlib.suppress(ConnectionClosed):
                    await live.connection.close(code, reason)
            else:
                with contextlib.suppress(ConnectionClosed):
                    await upstream.close(1000, "client done")
    finally:
        await _stop(live, tasks, upstream)


# --- plain: raw PCM in, JSON events out -----------------------------------------------------------


PLAIN_FORMATS = ("pcm", "pcm16k")


def plain_sample_rate(params: Sequence[tuple[str, str]]) -> int:
    """The sample rate of the plain door's audio, from `format` (`pcm`: 16-bit little-endian mono
    at `sample_rate`, 16000 unless said; `pcm16k`) or a Refusal saying what it takes."""
    query = {k.lower(): v for k, v in params}
    kind = query.get("format", "pcm").lower()
    if kind not in PLAIN_FORMATS:
        raise Refusal(
            400,
            "unsupported_format",
            f"format {kind[:20]} is not supported here; send format=pcm (16-bit little-endian mono, "
            "with sample_rate) or format=pcm16k",
        )
    rate = query.get("sample_rate", "16000")
    if not (rate.isascii() and rate.isdigit()) or not 8000 <= int(rate) <= 48000:
        raise Refusal(400, "unsupported_format", "sample_rate must be whole Hz from 8000 to 48000")
    if kind == "pcm16k" and int(rate) != 16000:
        raise Refusal(400, "unsupported_format", "format=pcm16k is 16000 Hz; use format=pcm with sample_rate")
    return int(rate)


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
        upstream = await _connect(
            self.relay,
            "stt",
            CONVERSATION_PATH,
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
        await asyncio.wait_for(live.connection.send(event), relay.settings.keepalive_s)
    except TimeoutError:
        live.end(1008, 1008, "the app is not reading its results")
        return False
    return True


async def plain(relay: Context, live: Live, pending: Pending) -> None:
    params = dict((k.lower(), v) for k, v in pending.params)
    sample_rate = plain_sample_rate(pending.params)  # checked at the handshake
    live.stream.byte_rate = 2 * sample_rate
    azure = _PlainUpstream(relay, live, params.get("language", "en-US"), sample_rate)
    try:
        await azure.connect()
    except UpstreamError as exc:
        live.end(1013, 1013, f"{relay.upstream_name} unavailable: {exc}")
        return
    stream, client = live.stream, live.connection
    live.in_turn = True
    opened = time.monotonic()
    finished = asyncio.Event()

    async def app_to_azure() -> None:
        async for message in client:
            if type(message) is bytes:
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
        await _stop(live, tasks, azure.connection)
