"""An offline stand-in for Azure Speech recognition, for `speechgate dev` without an Azure account.

PocketSphinx (its en-US model ships in the wheel) recognizes; this module speaks USP like Azure
does, so the relay uses it as its upstream through the same code as for Azure, and both front
doors and the official Speech SDKs work unchanged. Accuracy is low: it is for trying the path, not
for judging recognition.

`OfflineTurn` is the protocol logic without I/O: audio in, the USP messages Azure would send out
(turn.start, speech.startDetected, speech.hypothesis, speech.phrase, speech.endDetected, turn.end).
`OfflineSpeech` is the WebSocket edge; decoding runs in a worker thread, one turn at a time. It
also answers synthesis, through espeak-ng when the machine has it (speechgate/devtools/offline_synthesis.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from speechgate.devtools import offline_synthesis as synthesis
from speechgate.relay import usp
from speechgate.relay.auth import Refusal
from speechgate.relay.endpoints import endpoint_for

TICKS_PER_S = 10_000_000
HYPOTHESIS_EVERY_S = 0.3  # a partial result for about every this much speech
INITIAL_SILENCE_S = 5.0  # interactive mode gives up on a turn without speech, as Azure does
Event = tuple[str, dict[str, Any]]  # a USP path and its JSON body

_ALTERNATE = re.compile(r"\(\d+\)$")  # "the(2)": the dictionary's second pronunciation
_NOT_WORDS = {"<s>", "</s>", "<sil>"}


def _ticks(seconds: float) -> int:
    return round(seconds * TICKS_PER_S)


class DecoderPool:
    """PocketSphinx decoders take ~0.4 s to load: keep the idle ones for the next turn.

    A decoder given back forgets what it heard: its feature extraction, whose cepstral mean and
    noise statistics PocketSphinx adapts as it listens, starts again as a fresh decoder's.
    Otherwise the same audio would be recognized differently depending on what the decoder heard
    before."""

    def __init__(self) -> None:
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def take(self) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        from pocketsphinx import Decoder  # imported here: loading the model is the slow part

        return Decoder(samprate=16000, loglevel="FATAL")

    def give_back(self, decoder: Any) -> None:
        decoder.reinit_feat()
        with self._lock:
            self._idle.append(decoder)


@dataclass
class OfflineTurn:
    """One recognition turn: `feed` audio (16 kHz 16-bit mono PCM), then `finish`.

    Conversation and dictation modes give a phrase for every stretch of speech between pauses;
    interactive mode (the SDKs' recognize_once) ends the turn after the first phrase.
    """

    decoder: Any
    mode: str = "conversation"
    detailed: bool = False
    base_s: float = 0.0  # where this turn starts on the stream's time line (a continuation)
    done: bool = False
    _endpointer: Any = None
    _pending: bytes = b""
    _heard_s: float = 0.0
    _speech_started: bool = False
    _in_utterance: bool = False
    _utterance_start_s: float = 0.0
    _last_hypothesis: str = ""
    _since_hypothesis_s: float = 0.0
    _phrases: int = 0
    _started: bool = False
    _events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        from pocketsphinx import Endpointer

        self._endpointer = Endpointer(window=0.3)

    def feed(self, pcm: bytes) -> list[Event]:
        """Recognize more audio; return the messages Azure would have sent by now."""
        self._start()
        if self.done:
            return self._take()
        data = self._pending + pcm
        size = self._endpointer.frame_bytes
        whole = len(data) - len(data) % size
        self._pending = data[whole:]
        for offset in range(0, whole, size):
            self._frame(data[offset : offset + size])
            if self.done:
                break
        return self._take()

    def finish(self) -> list[Event]:
        """The end of the audio: the last phrase, then the end of the turn."""
        self._start()
        if not self.done:
            if self._in_utterance:
                # The endpointer flushes its window here, but cannot take an empty last frame
                # (audio that ends on a frame boundary): one silent sample stands in for it.
                rest = self._endpointer.end_stream(self._pending or b"\0\0")
                if rest:
                    self.decoder.process_raw(rest, False, False)
                self._end_utterance(self._heard_s)
            if self._phrases == 0:  # the SDKs wait for a phrase in every turn
                status = "NoMatch" if self._speech_started else "InitialSilenceTimeout"
                self._emit(usp.PHRASE, self._no_match(status))
            self._end_turn()
        return self._take()

    def close(self) -> None:
        """Leave the decoder ready for another turn, whatever state this one ended in."""
        if self._in_utterance:
            self.decoder.end_utt()
            self._in_utterance = False

    # --- inside --------------------------------------------------------------------------------

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._emit(usp.TURN_START, {"context": {"serviceTag": usp.new_request_id()}})

    def _frame(self, frame: bytes) -> None:
        ep = self._endpointer
        self._heard_s += ep.frame_length
        was_in_speech = ep.in_speech
        speech = ep.process(frame)
        if speech is None:
            if self.mode == "interactive" and not self._speech_started and self._heard_s >= INITIAL_SILENCE_S:
                self._emit(usp.PHRASE, self._no_match("InitialSilenceTimeout"))
                self._end_turn()
            return
        if not was_in_speech:
            self._in_utterance = True
            self._utterance_start_s = ep.speech_start
            self._since_hypothesis_s = 0.0
            self._last_hypothesis = ""
            self.decoder.start_utt()
            if not self._speech_started:
                self._speech_started = True
                self._emit(usp.START_DETECTED, {"Offset": _ticks(self.base_s + ep.speech_start)})
        self.decoder.process_raw(speech, False, False)
        if not ep.in_speech:
            self._end_utterance(ep.speech_end)
            return
        self._since_hypothesis_s += ep.frame_length
        if self._since_hypothesis_s >= HYPOTHESIS_EVERY_S:
            self._since_hypothesis_s = 0.0
            hypothesis = self.decoder.hyp()
            text = _words(hypothesis.hypstr if hypothesis else "")
            if text and text != self._last_hypothesis:
                self._last_hypothesis = text
                start = self.base_s + self._utterance_start_s
                self._emit(
                    usp.HYPOTHESIS,
                    {
                        "Text": text,
                        "Offset": _ticks(start),
                        "Duration": _ticks(self.base_s + self._heard_s - start),
                    },
                )

    def _end_utterance(self, end_s: float) -> None:
        self.decoder.end_utt()
        self._in_utterance = False
        hypothesis = self.decoder.hyp()
        text = _words(hypothesis.hypstr if hypothesis else "")
        words = [s for s in self.decoder.seg() if s.word not in _NOT_WORDS and not s.word.startswith("[")]
        if not text or not words:
            return  # a noise, not speech: Azure says nothing either
        # Segment frames are 10 ms from the utterance's start.
        start = self._utterance_start_s + words[0].start_frame / 100
        end = min(self._utterance_start_s + (words[-1].end_frame + 1) / 100, max(end_s, start))
        self._phrases += 1
        body: dict[str, Any] = {
            "RecognitionStatus": "Success",
            "Offset": _ticks(self.base_s + start),
            "Duration": _ticks(end - start),
        }
        display = text[0].upper() + text[1:] + "."
        if self.detailed:
            confidence = round(min(1.0, max(0.0, 2.0 ** (hypothesis.prob / 1000))), 4) if hypothesis else 0.0
            body["NBest"] = [
                {
                    "Confidence": confidence,
                    "Lexical": text,
                    "ITN": text,
                    "MaskedITN": text,
                    "Display": display,
                }
            ]
        else:
            body["DisplayText"] = display
        self._emit(usp.PHRASE, body)
        if self.mode == "interactive":
            self._end_turn()

    def _no_match(self, status: str) -> dict[str, Any]:
        return {"RecognitionStatus": status, "Offset": _ticks(self.base_s), "Duration": _ticks(self._heard_s)}

    def _end_turn(self) -> None:
        self.close()
        self._emit(usp.END_DETECTED, {"Offset": _ticks(self.base_s + self._heard_s)})
        self._emit(usp.TURN_END, {})
        self.done = True

    def _emit(self, path: str, body: dict[str, Any]) -> None:
        self._events.append((path, body))

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events


def _words(hypstr: str) -> str:
    return " ".join(_ALTERNATE.sub("", w) for w in hypstr.split() if not w.startswith("["))


def _continuation_s(context: dict[str, Any]) -> float:
    """A follow-on turn says where its audio starts: `continuation.audio.streams.1.offset`, ticks."""
    try:
        return int(context["continuation"]["audio"]["streams"]["1"]["offset"]) / TICKS_PER_S
    except (KeyError, TypeError, ValueError):
        return 0.0


def _kind(path: str) -> str:
    """The kind of endpoint a path is, as the relay routes it ("" when none)."""
    try:
        return endpoint_for(path).kind
    except Refusal:
        return ""


class OfflineSpeech:
    """The USP service: what the relay connects to in place of Azure Speech recognition."""

    def __init__(self) -> None:
        self.pool = DecoderPool()

    def check(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse, before the upgrade, what this recognizer cannot do, saying so."""
        url = urlsplit(request.path)
        kind = _kind(url.path)
        if kind == "synthesis":
            if synthesis.ESPEAK is None:
                return connection.respond(
                    HTTPStatus.NOT_IMPLEMENTED,
                    "apt install espeak-ng for offline synthesis",  # short: the app sees it in a close reason
                )
            return None
        if kind not in ("recognition", "universal"):
            return connection.respond(HTTPStatus.NOT_FOUND, f"offline service: no {kind or 'such path'} here")
        language = dict(parse_qsl(url.query)).get("language", "en-US")
        if not language.lower().startswith("en"):
            return connection.respond(HTTPStatus.BAD_REQUEST, "offline recognizer: English (en-US) only")
        return None

    async def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        url = urlsplit(ws.request.path)
        if _kind(url.path) == "synthesis":
            await self._synthesize(ws)
            return
        # v1 names its mode in the path; universal v2 (no mode in it) recognizes as conversation does
        mode = url.path.removeprefix("/stt").removeprefix("/speech/recognition/").split("/", 1)[0]
        if _kind(url.path) == "universal":
            mode = "conversation"
        detailed = dict(parse_qsl(url.query)).get("format", "simple").lower() == "detailed"
        turn: OfflineTurn | None = None
        request_id = ""
        try:
            async for message in ws:
                if isinstance(message, str):
                    msg = usp.parse_text(message)
                    if msg.path == usp.SPEECH_CONTEXT:
                        if turn is not None:
                            await asyncio.to_thread(turn.close)
                            self.pool.give_back(turn.decoder)
                        request_id = msg.request_id
                        decoder = await asyncio.to_thread(self.pool.take)
                        turn = OfflineTurn(decoder, mode, detailed, _continuation_s(msg.json()))
                    continue
                if turn is None:
                    continue  # audio before any speech.context: nothing to answer yet
                frame = usp.parse_binary(message)
                payload = frame.body
                if usp.riff_byte_rate(payload):
                    payload = payload[44:]  # the turn's WAV header
                if frame.body:
                    events = await asyncio.to_thread(turn.feed, payload)
                else:
                    events = await asyncio.to_thread(turn.finish)
                for path, body in events:
                    await ws.send(usp.encode_text(path, request_id, body, "application/json; charset=utf-8"))
        except (ConnectionClosed, usp.ProtocolError):
            pass
        finally:
            if turn is not None:
                await asyncio.to_thread(turn.close)
                self.pool.give_back(turn.decoder)

    async def _synthesize(self, ws: ServerConnection) -> None:
        output = "raw-16khz-16bit-mono-pcm"  # until `synthesis.context` says which
        try:
            async for message in ws:
                if not isinstance(message, str):
                    continue
                msg = usp.parse_text(message)
                if msg.path == usp.SYNTHESIS_CONTEXT:
                    output = msg.json().get("synthesis", {}).get("audio", {}).get("outputFormat", output)
                elif msg.path == usp.SSML:
                    try:
                        riff, rate = synthesis.pcm_format(output)
                        text, language = synthesis.ssml_text(msg.body.decode("utf-8", "replace"))
                        pcm = await synthesis.speak(text, language, rate)
                    except synthesis.SynthesisError as exc:
                        await ws.close(1007, str(exc))  # passed on: the SDKs cancel and say why
                        return
                    for frame in synthesis.synthesis_messages(msg.request_id, pcm, riff, rate):
                        await ws.send(frame)
        except (ConnectionClosed, usp.ProtocolError):
            pass

    @contextlib.asynccontextmanager
    async def running(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve on a loopback port; yields the endpoint URL to give the relay."""
        async with serve(
            self.handle,
            host,
            port,
            process_request=self.check,
            compression=None,
            server_header=None,
            logger=logging.getLogger("speechgate.offline"),
        ) as server:
            bound = next(iter(server.sockets)).getsockname()[1]
            yield f"ws://{host}:{bound}"
