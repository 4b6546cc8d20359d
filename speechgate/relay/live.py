"""A stream in progress (`Live`), the admission that opens one (`Pending`), and what the doors
and the splice need of the relay (`Context`): the types the server, the doors and the splice all
use, in a module of their own, so that none of those imports another for its types (no cycle).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from speechgate.core.claims import AccessClaims
from speechgate.core.settings import Settings
from speechgate.relay import frames, languages, libopus, usp
from speechgate.relay.endpoints import Endpoint
from speechgate.relay.metrics import RelayMetrics
from speechgate.relay.pool import Placement, Pool
from speechgate.relay.sessions import Admission, Sessions, Stream
from speechgate.relay.upstream import HUNG, Credentials, UpstreamError

log = logging.getLogger("speechgate.relay")
TELEMETRY_GRACE_S = 1.0  # a drained stream's wait for the app's telemetry after its last turn
NOT_READING = "the app is not reading its results"
CLOSE_TIMEOUT_S = 6.0  # for a whole close: websockets' close_timeout (5 s), and a moment to write it


class Context(Protocol):
    """What the doors and the splice use of the relay: no more than this."""

    settings: Settings
    metrics: RelayMetrics
    credentials: Credentials
    upstream_name: str  # what the apps are told closed or failed: "Azure Speech"
    workers: Executor  # for work that would hold up the event loop (decoding long Opus chunks)
    libopus: libopus.Library | None  # Opus' own decoder, where found (else FFmpeg decodes)
    pool: Pool  # the upstreams a stream may go to, when there is a pool


class SpliceHandle(Protocol):
    """A stream's splice (speechgate/relay/splice.py), as the stream itself ends it."""

    done: asyncio.Future[None]

    def close(self, code: int, reason: str) -> asyncio.Future[None]: ...


@dataclass
class Live:
    """A stream in progress: its connection, its session state, and how to end it."""

    connection: ServerConnection
    stream: Stream
    door: str  # "azure" or "plain"
    kid: str  # of the key that signed its token
    rules: languages.Rules  # what the app's messages may ask for
    in_turn: bool = False
    drain_after_turn: bool = False
    upstream: ClientConnection | None = None
    turn_audio_at: float | None = None  # when the current turn's first audio came, until a result
    code: int | None = None  # the close code the relay chose, when it chose one
    splice: SpliceHandle | None = None  # once the Azure door's data phase runs on a splice
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    closer: asyncio.Task[None] | None = None
    drain_timer: asyncio.TimerHandle | None = None
    audio: usp.AudioReading = field(default_factory=usp.AudioReading)  # the app's binary message
    placement: Placement | None = None  # its upstream of the pool and its slot there; None: no pool
    # When the app's handshake was answered: real time is counted from here (the flood check),
    # not from Azure's answer, which may come late (a slow upstream, a failover) while the app
    # sends in real time.
    opened: float = field(default_factory=time.monotonic)

    def turn_ended(self) -> None:
        """Azure ended the turn. A draining relay closes the stream once the app has said its last
        word on it (the SDKs send `telemetry` after each turn; a close before it fails that send,
        and the JavaScript SDK then reports an error instead of its result), or after a moment."""
        self.in_turn = False
        if self.drain_after_turn and self.drain_timer is None:
            self.drain_timer = asyncio.get_running_loop().call_later(TELEMETRY_GRACE_S, self.drained)

    def wav_header(self, header: bytes | bytearray) -> bool:
        """The WAV header a turn's audio starts with: meter by its format, or end the stream
        (1007, saying what to send) when the relay cannot."""
        try:
            self.stream.byte_rate = usp.wav_byte_rate(header)
        except usp.ProtocolError as exc:
            self.end(1007, 1007, str(exc))
            return False
        self.turn_audio_at = time.perf_counter()
        return True

    def app_binary(
        self,
        length: int,
        read: Callable[[int, int], bytes],
        fin: bool,
        head: int = -1,
        first: int = -1,
    ) -> bool:
        """A binary message from the app on the Azure door, or one fragment of it (`fin`: its last),
        metered through the stream's one `AudioReading` on both data paths (`head`, `first`: what
        the splice read of a whole message, see `AudioReading.whole`). False when the stream ends
        because of it: a WAV header the relay cannot meter by, no USP message, a flood."""
        reading = self.audio
        try:
            if head >= 0:
                audio, header = reading.whole(length, read, head, first)
            else:
                audio, header = reading.feed(length, read)
                if fin:
                    more, short = reading.end()
                    audio, header = audio + more, header or short
        except usp.ProtocolError as exc:
            self.end(1007, 1007, str(exc))
            return False
        if header is not None and not self.wav_header(header):  # before its audio counts
            return False
        if audio:
            stream = self.stream
            stream.add_audio(audio)
            if stream.flooding(self.opened):
                self.end(4000, 1008, "audio sent much faster than real time")
                return False
        return True

    def app_text(self, payload: bytes | bytearray) -> usp.Message | None:
        """A whole text message from the app on the Azure door, read once, strictly, for every rule:
        turns and continuations, then what the token allows. The message, or None when the stream
        ends because of it (a message that is not USP, or asks for what the token does not allow)."""
        stream = self.stream
        try:
            message = usp.parse_text(bytes(payload).decode("utf-8"))
        except (UnicodeDecodeError, usp.ProtocolError) as exc:
            unread = "a text message that is not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
            self.end(4000, 1008, f"{unread}; what it asks for cannot be checked")
            return None
        path = message.path.lower()
        if path in usp.TURN_START_PATHS:
            self.in_turn = True
            if path == usp.SPEECH_CONTEXT:  # once a turn: its continuation, if any
                stream.context(usp.continuation_s(message))
        reason = (
            languages.refusal(self.rules, path, message.body) if path in languages.CHECKED_PATHS else None
        )
        if reason is not None:
            self.end(4000, 1008, reason)
            return None
        return message

    def drained(self) -> None:
        if self.drain_timer is not None:
            self.drain_timer.cancel()
        self.end(1001, 1001, "relay draining; reconnect")

    def end(self, azure_code: int, plain_code: int, reason: str) -> None:
        """Close both legs with the code this door's clients react to correctly."""
        if self.stream.closing_reason is not None:
            return
        self.stream.closing_reason = reason
        code = self.code = azure_code if self.door == "azure" else plain_code
        if self.splice is not None:  # at once: not one more of the app's frames goes on to Azure
            self.splice.close(code, frames.fit_reason(reason))
        self.closer = asyncio.ensure_future(close_both(self, code, reason))


@dataclass(frozen=True)
class Pending:
    claims: AccessClaims
    kid: str
    stream_id: str
    endpoint: Endpoint
    path: str
    params: list[tuple[str, str]]
    query: str  # what the Azure door passes on (speechgate.relay.endpoints.upstream_query)
    sessions: Sessions
    admission: Admission
    rules: languages.Rules
    placement: Placement | None = None  # its upstream of the pool; None: the configured one, no pool

    def stream(self) -> Stream:
        """The stream this admission opens, on the session's time line where its last one ended."""
        return Stream(
            self.claims,
            self.stream_id,
            self.admission.started_ms,
            backend=self.sessions,
            start_mark_s=self.admission.resume_mark_s,
            replay_budget_s=self.admission.replay_budget_s,
        )


async def upstream_hung(relay: Context, live: Live) -> None:
    """Azure answered no ping: mark its upstream down like one that refused (for every relay), and
    move the stream's placement to another of its zones when there is one (the plain door then
    reconnects there; the Azure door's SDK reconnects through a new handshake)."""
    relay.metrics.upstream_failures.inc()
    log.warning("%s answered no ping: the stream leaves it", relay.upstream_name)
    if live.placement is not None:
        moved = await relay.pool.failed(live.placement, UpstreamError(HUNG, True))
        if moved is not None:
            live.placement = moved


async def close_both(live: Live, code: int, reason: str) -> None:
    reason = frames.fit_reason(reason)  # a longer one would fail the close and leave the 1000
    if live.splice is not None:
        await live.splice.close(code, reason)
        return
    await bounded_close(live.connection, code, reason)
    if live.upstream is not None:
        await bounded_close(live.upstream, 1000, "client gone")


async def bounded_close(connection: ServerConnection | ClientConnection, code: int, reason: str) -> None:
    """A close handshake that ends in time. `websockets` bounds the wait for the peer's answer,
    but not the writing of our close frame: to a peer that never reads, whose socket is full, it
    waits until the peer leaves (or a keepalive ping times out, up to twice SPEECHGATE_KEEPALIVE_S),
    holding the connection, its buffers and the stream's slot. Past the bound, the transport is
    aborted."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await connection.close(code, reason)
    except TimeoutError:
        if connection.transport is not None:
            connection.transport.abort()
    except ConnectionClosed:
        pass
