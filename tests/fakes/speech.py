"""A local Azure Speech service for the tests: USP over WebSocket, as in the reference transcript.

Recognition: each `speech.context` starts a turn; audio frames are answered with `turn.start`,
`speech.startDetected`, hypotheses, a `speech.phrase` for every second of audio (conversation
mode gives several phrases per turn) and, after the empty end-of-audio frame, the last phrase,
`speech.endDetected` and `turn.end`. A connection that asks for translation (`to=` in its query)
gets `translation.hypothesis` and `translation.phrase` instead, each target language's text
being the recognized text prefixed with `[lang]`, and `translation.synthesis.end` when it asked
for a voice. A `speech.context` with candidate languages (language identification) gets the
first candidate as every phrase's `PrimaryLanguage`. The shapes are those the SDKs' own parsers
read (`ITranslationPhrase`, `ISimpleSpeechPhrase` in the JavaScript SDK). Synthesis: `ssml` is
answered with `turn.start`, a `response`, audio frames and `turn.end`. Failure modes: refuse the
handshake with a status, close every connection after some seconds, close with a code mid-turn.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from speechgate.relay import usp

KEY = "0123456789abcdef0123456789abcdef"
# The fields of Azure's voices list that the SDKs read (`VoiceInfo`), for three voices.
VOICES = [
    {
        "Name": f"Microsoft Server Speech Text to Speech Voice ({locale}, {short})",
        "ShortName": f"{locale}-{short}",
        "DisplayName": short.removesuffix("Neural"),
        "LocalName": short.removesuffix("Neural"),
        "Gender": gender,
        "Locale": locale,
        "LocaleName": name,
        "SampleRateHertz": "24000",
        "VoiceType": "Neural",
        "Status": "GA",
        "WordsPerMinute": "150",
    }
    for locale, short, gender, name in [
        ("en-US", "AvaNeural", "Female", "English (United States)"),
        ("de-DE", "KatjaNeural", "Female", "German (Germany)"),
        ("fr-FR", "HenriNeural", "Male", "French (France)"),
    ]
]
BYTES_PER_S = 32000


@dataclass
class FakeSpeech:
    key: str = KEY
    refuse_status: int | None = None
    close_after_s: float | None = None  # Azure ends connections after ~10 minutes; tests use less
    close_mid_turn: int | None = None  # close with this code once audio flows
    refuse_ssml: tuple[int, str] | None = None  # close with this code and reason on `ssml`
    text: str = "Hello from the fake service."
    phrase_every_s: float = 1.0  # a phrase for every this much audio heard
    bearer_tokens: set[str] = field(default_factory=set)  # accepted as `Authorization: Bearer …` too
    handshakes: list[dict[str, Any]] = field(default_factory=list)
    audio_bytes: int = 0
    connections: int = 0
    synthesis_frames: int = 3  # audio frames per synthesis turn
    synthesis_sent: int = 0
    wav_rates: list[int] = field(default_factory=list)  # the sample rate of each WAV header heard
    contexts: list[Any] = field(default_factory=list)  # each speech.context body
    texts: list[str] = field(default_factory=list)  # every text message received, as received
    voices: list[dict[str, str]] = field(default_factory=lambda: list(VOICES))  # GET …/voices/list
    extra_keys: set[str] = field(default_factory=set)  # accepted too: a resource's second key
    max_streams: int | None = None  # live connections beyond this are refused with 429, as Azure does
    drop: bool = False  # drop every connection before answering (a resource that cannot be reached)
    live: int = 0
    refused: int = 0  # handshakes refused for max_streams
    dropped: int = 0
    handshake_delay_s: float = 0.0  # answer handshakes this late (a slow or struggling resource)

    def check(self, connection: ServerConnection, request: Request) -> Response | None:
        self.handshakes.append({"path": request.path, "headers": dict(request.headers.raw_items())})
        if self.drop:
            self.dropped += 1
            assert connection.transport is not None
            connection.transport.abort()
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "dropped\n")  # never sent
        if self.max_streams is not None and self.live >= self.max_streams:
            self.refused += 1
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many concurrent requests\n")
        if self.refuse_status is not None:
            return connection.respond(HTTPStatus(self.refuse_status), "refused by the fake\n")
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        key = request.headers.get("Ocp-Apim-Subscription-Key")
        if key != self.key and key not in self.extra_keys and bearer not in self.bearer_tokens:
            return connection.respond(HTTPStatus.UNAUTHORIZED, "bad key\n")
        if request.path.partition("?")[0] == "/cognitiveservices/voices/list":
            response = connection.respond(HTTPStatus.OK, json.dumps(self.voices))
            response.headers["Content-Type"] = "application/json"
            return response
        return None

    async def answer(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.handshake_delay_s:
            await asyncio.sleep(self.handshake_delay_s)  # the slowness this fake plays
        return self.check(connection, request)

    async def handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        self.live += 1
        closer = None
        if self.close_after_s is not None:
            closer = asyncio.get_running_loop().call_later(
                self.close_after_s, lambda: asyncio.ensure_future(ws.close(1000, "connection time limit"))
            )
        try:
            await self._serve(ws)
        except ConnectionClosed:
            pass
        finally:
            self.live -= 1
            if closer is not None:
                closer.cancel()

    async def _serve(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(ws.request.path).query)
        turn = _Turn(
            targets=[t for value in query.get("to", []) for t in value.split(",") if t],
            voice=bool(query.get("voice")) or "requireVoice" in query.get("features", []),
        )
        request_id = ""
        heard = 0  # audio bytes in this turn
        phrases = 0
        started = False
        async for message in ws:
            if isinstance(message, str):
                self.texts.append(message)
                msg = usp.parse_text(message)
                if msg.path == "speech.context":
                    context = msg.json()
                    self.contexts.append(context)
                    turn.asked(context)
                    request_id, heard, phrases, started = msg.request_id, 0, 0, False
                elif msg.path == "ssml" and self.refuse_ssml is not None:
                    await ws.close(*self.refuse_ssml)  # as Azure does, e.g. for an unknown voice
                    return
                elif msg.path == "ssml":
                    await self._synthesize(ws, msg.request_id)
                continue
            frame = usp.parse_binary(message)
            request_id = frame.request_id or request_id
            payload = frame.body
            if not started:
                started = True
                await self._send(
                    ws, "turn.start", {"context": {"serviceTag": usp.new_request_id()}}, request_id
                )
                await self._send(ws, "speech.startDetected", {"Offset": 0}, request_id)
            if usp.riff_byte_rate(payload):
                self.wav_rates.append(int.from_bytes(payload[24:28], "little"))
                payload = payload[44:]
            heard += len(payload)
            self.audio_bytes += len(payload)
            if self.close_mid_turn is not None and heard > 0:
                await ws.close(self.close_mid_turn, "closed by the fake mid-turn")
                return
            if payload and heard // int(BYTES_PER_S * self.phrase_every_s) > phrases:
                phrases += 1
                await self._phrase(ws, turn, request_id, phrases)
            elif payload and heard % (BYTES_PER_S // 2) < len(payload):
                hypothesis = {"Text": "hello", "Offset": 0, "Duration": heard * 10_000_000 // BYTES_PER_S}
                await self._send(ws, *turn.result("hypothesis", hypothesis), request_id)
            if not frame.body:  # end of audio
                phrases += 1
                await self._phrase(ws, turn, request_id, phrases)
                await self._send(
                    ws, "speech.endDetected", {"Offset": heard * 10_000_000 // BYTES_PER_S}, request_id
                )
                if turn.targets and turn.voice:
                    await self._send(
                        ws, "translation.synthesis.end", {"SynthesisStatus": "Success"}, request_id
                    )
                await self._send(ws, "turn.end", {}, request_id)
                started = False

    async def _phrase(self, ws: ServerConnection, turn: _Turn, request_id: str, n: int) -> None:
        phrase = {
            "RecognitionStatus": "Success",
            "Offset": (n - 1) * 10_000_000,
            "Duration": 8_000_000,
            "DisplayText": self.text,
        }
        await self._send(ws, *turn.result("phrase", phrase), request_id)

    async def _synthesize(self, ws: ServerConnection, request_id: str) -> None:
        stream_id = usp.new_request_id()
        await self._send(ws, "turn.start", {"context": {"serviceTag": usp.new_request_id()}}, request_id)
        await self._send(ws, "response", {"audio": {"streamId": stream_id}}, request_id)
        for _ in range(self.synthesis_frames):
            await ws.send(
                usp.encode_binary(
                    "audio", request_id, b"\0" * 3200, "audio/x-wav", extra={"X-StreamId": stream_id}
                )
            )
            self.synthesis_sent += 1
        await self._send(ws, "turn.end", {}, request_id)

    @staticmethod
    async def _send(ws: ServerConnection, path: str, body: dict[str, Any], request_id: str) -> None:
        await ws.send(usp.encode_text(path, request_id, body, "application/json; charset=utf-8"))


@dataclass
class _Turn:
    """What one connection asked for (its query, then each speech.context): translation
    targets, a spoken translation, a language to report."""

    targets: list[str]
    voice: bool
    language: str | None = None

    def result(self, kind: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The path and body of a hypothesis or phrase, as recognition or as translation."""
        body = dict(body)
        text = body.get("DisplayText", body.get("Text", ""))
        if self.language is not None:
            body["PrimaryLanguage"] = {"Language": self.language, "Confidence": "High"}
        if not self.targets:
            return f"speech.{kind}", body
        body.setdefault("Text", text)
        body["Translation"] = {
            "TranslationStatus": "Success",
            "Translations": [{"Language": t, "Text": f"[{t}] {text}"} for t in self.targets],
        }
        return f"translation.{kind}", body

    def asked(self, context: Any) -> None:
        """What a `speech.context` asks for: the first candidate of language identification as
        the language heard; translation targets and a voice (as universal v2 carries them)."""
        if not isinstance(context, dict):
            return
        languages = (context.get("languageId") or {}).get("languages") or []
        self.language = str(languages[0]) if languages else None
        self.targets = (context.get("translation") or {}).get("targetLanguages") or self.targets
        self.voice = self.voice or bool(context.get("synthesis"))


class FakeSpeechServer:
    """Runs a FakeSpeech on a free loopback port in a thread: `with FakeSpeechServer(fake) as s:`."""

    def __init__(self, fake: FakeSpeech) -> None:
        self.fake = fake
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server: Server
        async with serve(
            self.fake.handle,
            "127.0.0.1",
            0,
            process_request=self.fake.answer,
            subprotocols=None,
            compression=None,
        ) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeSpeechServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake speech service did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


async def serve_forever(host: str, port: int) -> None:
    """The fake on one address until the process is stopped: the container stack's Azure (deploy/smoke.py)."""
    fake = FakeSpeech()
    async with serve(fake.handle, host, port, process_request=fake.check, compression=None) as server:
        print(f"fake speech listening on {host}:{port}", flush=True)  # what a test waits for
        await server.serve_forever()


if __name__ == "__main__":  # python -m tests.fakes.speech HOST PORT
    import sys

    asyncio.run(serve_forever(sys.argv[1], int(sys.argv[2])))
