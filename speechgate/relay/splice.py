"""The Azure-compatible door's data phase: both sockets joined, frames forwarded as bytes.

The `websockets` library does both handshakes (and everything else in the relay); once a stream
is admitted and Azure has answered, the relay takes the two transports over with an asyncio
protocol per leg. Each received chunk is cut into frames (speechgate/relay/frames.py); data frames are
written to the other leg unchanged, whole chunks at a time when they hold whole frames; only the
few bytes the relay needs are read: an audio frame's 2-byte USP header length and WAV header
(metering), and the `Path:` of text frames (turns, first results). Control frames stay on their
leg: pings are answered, closes follow the door's close-code rules (speechgate/relay/doors/).

Backpressure is the transports' own: when one leg's write buffer passes its high-water mark, the
other leg stops reading until it drains, so nothing grows without bound.

Size: the two legs, what each sees of the other's frames, and the liveness and close rules of
both sides share one state (closing, who closed, the timers): one class each for the legs and the
splice, kept together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from speechgate.relay import frames, usp
from speechgate.relay.frames import CLOSE, CONTINUATION, PING, TEXT, FrameError, Header
from speechgate.relay.live import NOT_READING, Context, Live, upstream_hung
from speechgate.relay.usp import RESULTS, TURN_END_BYTES

log = logging.getLogger("speechgate.relay.splice")
WRITE_HIGH, WRITE_LOW = 64 * 1024, 16 * 1024
CLOSE_TIMEOUT_S = 5.0
PATH_WINDOW = 512  # the `Path:` header of a text message is within its first bytes
_EMPTY = b""
SAMPLE_MASK = 15  # the forward-time histogram observes 1 chunk in 16: timing each costs more than it tells


def _unread(offset: int, count: int) -> bytes:
    raise AssertionError("AudioReading.whole reads nothing of a message without a WAV header")


def azure_closed(code: int, reason: str, in_turn: bool, upstream: str = "Azure Speech") -> tuple[int, str]:
    """The close the app gets when Azure closes, with Azure's reason kept. 1007 (Azure refused what
    it was sent: bad SSML, an unknown voice or output format) passes on: both SDKs cancel at once
    and show why, where a retry would be refused again. Between turns 1000 and 1001 pass on (the
    SDK reconnects by itself); anything else becomes 1011, and never 1000 mid-turn (the SDKs hang)."""
    if code != 1007 and (in_turn or code not in (1000, 1001)):
        code = 1011
    said = f"{upstream} closed the connection" + (f": {reason}" if reason else "")
    return code, frames.fit_reason(said)


def can_take_over(connection: Any) -> bool:
    """Whether `websockets` holds no data of this connection that the splice would miss."""
    try:
        return (
            not connection.protocol.reader.buffer
            and len(connection.recv_messages.frames) == 0
            and connection.transport is not None
            and not connection.transport.is_closing()
        )
    except AttributeError:  # another websockets version: take the safe path
        return False


class _Leg(asyncio.Protocol):
    """One side's transport: frames from it are inspected, then written to the other side."""

    def __init__(self, splice: Splice, connection: Any, from_app: bool) -> None:
        self.splice = splice
        self.connection = connection  # the websockets connection that did the handshake
        self.transport: Any = connection.transport
        self.from_app = from_app
        self.other: _Leg
        self.buffer: bytes | bytearray = _EMPTY  # a frame's start, until the rest of it comes
        self.message_opcode = 0  # the opcode of a fragmented message in progress
        self.message_bytes = 0  # its size so far: bounded like a whole frame (max_size)
        self.text = bytearray()  # a fragmented text message's payload so far, unmasked
        self.held = bytearray()  # and its frames as received, forwarded once it is whole and allowed
        self.sent_close = False
        self.closed = False
        self.heard = 0  # the splice's chunk count when this side last sent anything

    # --- asyncio.Protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        splice = self.splice
        splice.chunks += 1
        self.heard = splice.chunks
        timed = not splice.chunks & SAMPLE_MASK
        started = time.perf_counter() if timed else 0.0
        if self.buffer:
            self.buffer += data
            chunk: bytes | bytearray = self.buffer
        else:
            chunk = data
        offset = run = 0  # frames from `run` to `offset` are to be forwarded
        size = len(chunk)
        other = self.other
        try:
            while offset < size:
                header = frames.parse_header(chunk, offset, splice.max_size)
                if header is None or header.end > size:
                    break
                if header.opcode >= CLOSE:
                    if offset > run:
                        other.forward(chunk[run:offset])
                    run = header.end
                    self.control(chunk, header)
                elif not self.inspect(chunk, header, offset):
                    if offset > run:  # what came before it goes on (not once the stream is closing)
                        other.forward(chunk[run:offset])
                    run = header.end
                offset = header.end
        except FrameError as exc:
            splice.fail(self, exc.code, str(exc))
            return
        except Exception:  # a bug must end this stream cleanly, not kill the connection silently
            log.exception("splice failed on a frame")
            splice.fail(self, 1011, "relay error")
            return
        if offset > run and not other.sent_close and not other.closed:  # other.forward(), inlined
            other.transport.write(chunk if run == 0 and offset == size else chunk[run:offset])
        self.buffer = bytearray(chunk[offset:]) if offset < size else _EMPTY
        if splice.drain_after_flush:
            splice.drain_now()
        if timed:
            direction = "up" if self.from_app else "down"
            splice.relay.metrics.forward.labels(direction).observe(time.perf_counter() - started)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.splice.leg_lost(self)

    def pause_writing(self) -> None:
        if not self.other.closed:
            self.other.transport.pause_reading()  # this side is slow: stop taking from the other
        if self.from_app:
            self.splice.app_stalled(True)

    def resume_writing(self) -> None:
        if not self.other.closed:
            self.other.transport.resume_reading()
        if self.from_app:
            self.splice.app_stalled(False)

    # --- frames ----------------------------------------------------------------------------

    def forward(self, data: bytes | bytearray) -> None:
        """Write frames from the other side to this one, unless this side is closing."""
        if not self.sent_close and not self.closed:
            self.transport.write(data)

    def inspect(self, chunk: bytes | bytearray, header: Header, at: int) -> bool:
        """Meter and watch a data frame (at `at` in `chunk`); False when it is not to be forwarded
        with the frames around it."""
        splice = self.splice
        if splice.closing:
            return False
        if self.from_app:
            if header.mask is None:
                raise FrameError("frames from a client must be masked")
            return splice.from_app(chunk, header, self, at)
        if header.mask is not None:
            raise FrameError("frames from a server must not be masked")
        if header.opcode == TEXT:
            splice.from_azure_text(chunk, header)
        return True

    def control(self, chunk: bytes | bytearray, header: Header) -> None:
        if self.from_app and header.mask is None:
            raise FrameError("frames from a client must be masked")
        data = frames.payload(chunk, header)
        if header.opcode == PING:
            self.write_frame(frames.PONG, data)
        elif header.opcode == CLOSE:
            self.splice.close_received(self, *frames.parse_close(data))
        # a pong needs nothing

    def write_frame(self, opcode: int, data: bytes) -> None:
        """A frame of the relay's own: masked toward Azure (the relay is its client)."""
        if not self.closed:
            self.transport.write(frames.encode(opcode, data, masked=not self.from_app))

    def send_close(self, code: int, reason: str) -> None:
        if not self.sent_close:
            self.write_frame(CLOSE, frames.close_payload(code, reason))
            self.sent_close = True


class Splice:
    """An admitted Azure-door stream after the handshakes; `done` resolves when both legs closed."""

    def __init__(self, relay: Context, live: Live, app: Any, azure: Any) -> None:
        self.relay, self.live = relay, live
        self.max_size = relay.settings.max_frame_bytes
        self.app = _Leg(self, app, from_app=True)
        self.azure = _Leg(self, azure, from_app=False)
        self.app.other, self.azure.other = self.azure, self.app
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closing = False
        self.chunks = 0
        self.drain_after_flush = False
        self._deadline: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self.keepalive_s = relay.settings.keepalive_s
        self._heard_at_check = 0
        self._pinged_at: float | None = None
        self.ping_s = relay.settings.upstream_ping_s
        self._azure_check: asyncio.TimerHandle | None = None
        self._azure_heard_at_check = 0
        self._azure_pinged = False
        self.marking: asyncio.Future[None] | None = None  # the hung upstream's marking down
        self._stall: asyncio.TimerHandle | None = None  # the app's socket full since

    def start(self) -> None:
        for leg in (self.app, self.azure):
            task = getattr(leg.connection, "keepalive_task", None)
            if task is not None:  # pings would interleave with our frames: the splice answers them
                task.cancel()
            leg.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
            leg.transport.set_protocol(leg)
        for leg in (self.app, self.azure):
            leg.transport.resume_reading()
        self._keepalive = asyncio.get_running_loop().call_later(self.keepalive_s / 2, self._check_app)
        self._azure_check = asyncio.get_running_loop().call_later(self.ping_s, self._check_azure)

    def _check_app(self) -> None:
        """An app that vanished without closing (a phone losing its network) must not hold its
        stream slot. Checked every half keepalive period (the hot path only counts chunks): a
        quiet app is pinged after at most one period of silence and closed when a further
        period brings no answer, so it is found within twice the keepalive."""
        if self.closing or self.app.closed:
            return
        loop = asyncio.get_running_loop()
        if self.app.heard != self._heard_at_check:  # it spoke: all is well
            self._heard_at_check, self._pinged_at = self.app.heard, None
        elif self._pinged_at is None:
            self.app.write_frame(PING, b"speechgate")
            self._pinged_at = loop.time()
        elif loop.time() - self._pinged_at >= self.keepalive_s:  # quiet, and no pong since
            self.fail(self.app, 1011, "keepalive ping timeout")
            return
        self._keepalive = loop.call_later(self.keepalive_s / 2, self._check_app)

    def app_stalled(self, stalled: bool) -> None:
        """The app's socket is full (it reads nothing of what Azure sends), or has room again. As on
        the plain door: full for SPEECHGATE_KEEPALIVE_S, the stream ends (4000) rather than hold its
        slot until its session's end; the close that cannot be written is aborted in its time."""
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if stalled and not self.closing:
            self._stall = asyncio.get_running_loop().call_later(
                self.keepalive_s, self.live.end, 4000, 1008, NOT_READING
            )

    def _check_azure(self) -> None:
        """An Azure that stops answering (a hung resource) must not keep the stream: after
        SPEECHGATE_UPSTREAM_PING_S without a word from it, it is pinged; when as long again
        brings nothing, the app gets 1011 (the SDKs reconnect, through a new handshake, to
        another upstream) and a pool upstream is marked down for every relay."""
        if self.closing or self.azure.closed:
            return
        if self.azure.heard != self._azure_heard_at_check or self._stall is not None:
            # It spoke, or the relay is not reading it (the app's socket is full): all is well.
            self._azure_heard_at_check, self._azure_pinged = self.azure.heard, False
        elif not self._azure_pinged:
            self.azure.write_frame(PING, b"speechgate")
            self._azure_pinged = True
        else:
            self.live.code = 1011
            self.closing = True
            self.app.send_close(1011, f"{self.relay.upstream_name} did not answer; reconnect")
            self.azure.transport.abort()
            self._arm_deadline()
            self.marking = asyncio.ensure_future(upstream_hung(self.relay, self.live))
            return
        self._azure_check = asyncio.get_running_loop().call_later(self.ping_s, self._check_azure)

    # --- what the legs see -----------------------------------------------------------------

    def from_app(self, chunk: bytes | bytearray, header: Header, leg: _Leg, at: int) -> bool:
        """An app's data frame (starting at `at` in `chunk`), read through the stream's one reading
        of each message (speechgate/relay/live.py: the message path reads the same way), however
        the message is fragmented. False when the frame is not to be forwarded now: the stream
        ends, or a text message is held until it is whole and allowed."""
        live = self.live
        opcode = header.opcode
        if opcode == CONTINUATION:
            opcode = leg.message_opcode
            if not opcode:
                raise FrameError("a continuation frame outside a fragmented message")
            leg.message_bytes += header.length
            if leg.message_bytes > self.max_size:  # as websockets bounds a message on the other path
                raise FrameError(f"message larger than {self.max_size} bytes over its fragments", 1009)
            if header.fin:
                leg.message_opcode = 0
        elif leg.message_opcode:
            raise FrameError("a new message before the last one's final fragment")
        elif not header.fin:
            leg.message_opcode, leg.message_bytes = opcode, header.length
        if opcode == frames.BINARY:
            if (
                header.fin
                and header.opcode == opcode
                and (head := frames.peek_u16(chunk, header)) is not None
            ):
                # A whole message in one frame, the usual: its header length and first payload byte
                # are all the reading needs of it, unless that byte may start a WAV header.
                start = 2 + head
                first = frames.byte_at(chunk, header, start) if start < header.length else -1
                read = _unread if first != 0x52 else self._reader(chunk, header)  # "R": perhaps RIFF
                return live.app_binary(header.length, read, True, head, first)
            return live.app_binary(header.length, self._reader(chunk, header), header.fin)
        # Text (speech.config, speech.context, ssml, telemetry): read whole, once. Fragments are
        # held back, not forwarded, until the message is whole and allowed.
        if not header.fin or leg.held:
            leg.text += frames.payload(chunk, header)
            leg.held += chunk[at : header.end]
            if not header.fin:
                return False
            payload: bytes | bytearray = leg.text
            held, leg.text, leg.held = leg.held, bytearray(), bytearray()
        else:
            payload, held = frames.payload(chunk, header), bytearray()
        message = live.app_text(payload)
        if message is None:
            return False
        if live.drain_timer is not None and message.path.lower() == "telemetry":
            self.drain_after_flush = True  # the app's last word on its turn: close after it
        if held:
            leg.other.forward(held)
            return False
        return True

    @staticmethod
    def _reader(chunk: bytes | bytearray, header: Header) -> Callable[[int, int], bytes]:
        return lambda offset, count: frames.peek(chunk, header, offset, count)

    def from_azure_text(self, chunk: bytes | bytearray, header: Header) -> None:
        live = self.live
        window = chunk[header.start : min(header.end, header.start + PATH_WINDOW)]
        if live.turn_audio_at is None and TURN_END_BYTES not in window:
            return  # most of Azure's messages: results while no first-result timing is pending
        path = usp.peek_path(window)
        if live.turn_audio_at is not None and path in RESULTS:
            self.relay.metrics.first_result.labels("azure").observe(time.perf_counter() - live.turn_audio_at)
            live.turn_audio_at = None
        if path == TURN_END_BYTES:
            live.turn_ended()

    def drain_now(self) -> None:
        """The turn a draining relay waited for has ended, and the app's telemetry has gone out."""
        self.drain_after_flush = False
        self.live.drained()

    # --- closing ---------------------------------------------------------------------------

    def close_received(self, leg: _Leg, code: int, reason: str) -> None:
        if self.closing:  # the answer to our close: this leg is done
            leg.transport.close()
            return
        self.closing = True
        if leg.from_app:  # the app is done: answer it, and end Azure's side politely
            self.live.code = code
            leg.send_close(code if code != 1005 else 1000, "")
            leg.transport.close()
            self.azure.send_close(1000, "client done")
        else:
            code, reason = azure_closed(code, reason, self.live.in_turn, self.relay.upstream_name)
            self.live.code = code
            leg.send_close(1000, "")
            leg.transport.close()
            self.app.send_close(code, reason)
        self._arm_deadline()

    def close(self, code: int, reason: str) -> asyncio.Future[None]:
        """The relay ends the stream: `code` to the app, a normal close to Azure."""
        if not self.closing:
            self.closing = True
            self.app.send_close(code, reason)
            self.azure.send_close(1000, "client gone")
            self._arm_deadline()
        return self.done

    def fail(self, leg: _Leg, code: int, reason: str) -> None:
        """A protocol error on one leg: close it with `code`; the app hears 1011 if Azure erred."""
        if self.closing:
            self._abort()
            return
        self.closing = True
        leg.send_close(code, reason)
        if leg.from_app:
            self.live.code = code
            self.azure.send_close(1000, "client gone")
        else:
            self.live.code = 1011
            self.app.send_close(1011, "Azure Speech sent a bad frame")
        self._arm_deadline()

    def leg_lost(self, leg: _Leg) -> None:
        other = leg.other
        if not other.closed:
            if not self.closing:  # gone without a close frame
                self.closing = True
                if leg.from_app:
                    other.send_close(1000, "client gone")
                else:
                    self.live.code = 1011
                    other.send_close(1011, "Azure Speech went away")
                self._arm_deadline()
            if leg.from_app:
                other.transport.close()  # Azure needs no answer from a client that is gone
            return
        # Both legs are closed: let `websockets` see it, so its handler and server finish.
        for timer in (self._deadline, self._keepalive, self._azure_check, self._stall):
            if timer is not None:
                timer.cancel()
        for each in (self.app, self.azure):
            with contextlib.suppress(Exception):
                each.connection.connection_lost(None)
        if not self.done.done():
            self.done.set_result(None)

    def _arm_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self._abort)

    def _abort(self) -> None:
        for leg in (self.app, self.azure):
            if not leg.closed:
                leg.transport.abort()
