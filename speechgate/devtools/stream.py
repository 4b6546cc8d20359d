"""`speechgate stream FILE.wav`: the reference client, what an app does, in one file.

1. Get a token from the token service (client credentials: the dev client's by default).
2. Open the plain front door `/v1/listen` with it, send the audio as 100 ms binary frames (paced in
   real time, or faster with `--fast`), then `{"type": "end"}`.
3. Read `partial` and `final` events until the relay closes with 1000.
`--sdk` does step 2 and 3 through the official Speech SDK on the Azure-compatible door instead.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from speechgate.relay.endpoints import CONVERSATION_PATH

CHUNK_BYTES = 3200  # 100 ms of 16 kHz 16-bit mono
BYTES_PER_S = 32000
FAST_BURST_S = 5.0  # --fast: this much at once, then 3x real time, inside the relay's flood limit
FAST_SPEEDUP = 3.0


class StreamError(Exception):
    """The stream could not be done; the message says why and what to do."""


@dataclass(frozen=True)
class Audio:
    """What a stream sends: 16 kHz PCM (`format=pcm`), or Opus in a container."""

    payload: bytes
    format: str = "pcm"  # the plain door's format=
    audio_s: float = 0.0

    @classmethod
    def pcm(cls, pcm: bytes) -> Audio:
        return cls(pcm, "pcm", len(pcm) / BYTES_PER_S)

    def chunks(self) -> list[tuple[bytes, int]]:
        """(what to send, the audio position it reaches in 16 kHz PCM bytes): 100 ms of PCM a
        message; compressed audio in 250 ms pieces, cut wherever the bytes fall, as recorders do."""
        size = CHUNK_BYTES if self.format == "pcm" else max(64, round(len(self.payload) / self.audio_s / 4))
        pcm_bytes = self.audio_s * BYTES_PER_S
        return [
            (
                self.payload[at : at + size],
                round(min(at + size, len(self.payload)) / len(self.payload) * pcm_bytes),
            )
            for at in range(0, len(self.payload), size)
        ]


@dataclass
class Result:
    """What one stream gave: the finals, and the timings the summary shows."""

    audio_s: float
    bytes_sent: int = 0
    started: float = field(default_factory=time.monotonic)
    finals: list[dict[str, Any]] = field(default_factory=list)
    first_partial_s: float | None = None  # from the first audio sent
    final_latency_s: list[float] = field(default_factory=list)  # each final: from its last audio sent
    _sent: list[tuple[int, float]] = field(default_factory=list)  # (audio bytes sent, when)

    def sent(self, position: int) -> None:
        self._sent.append((position, time.monotonic()))

    def event(self, event: dict[str, Any]) -> None:
        now = time.monotonic()
        if event["type"] == "partial" and self.first_partial_s is None:
            self.first_partial_s = now - self.started
        if event["type"] == "final":
            self.finals.append(event)
            end = (event["offset_ms"] + event["duration_ms"]) * BYTES_PER_S // 1000
            when = next((t for position, t in self._sent if position >= end), None)
            if when is not None:
                self.final_latency_s.append(now - when)

    def summary(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "type": "summary",
            "audio_s": round(self.audio_s, 2),
            "finals": len(self.finals),
            "first_partial_s": rounded(self.first_partial_s),
            "final_latency_s": rounded(max(self.final_latency_s, default=None)),
            "bytes_sent": self.bytes_sent,
            "pcm_bytes": round(self.audio_s * BYTES_PER_S),  # what 16 kHz PCM would have needed
        }


Listener = Callable[[dict[str, Any]], None]  # gets every partial and final event


def get_token(token_url: str, client_id: str, client_secret: str) -> str:
    try:
        answer = httpx.post(
            f"{token_url.rstrip('/')}/v1/token",
            data={"grant_type": "client_credentials"},
            auth=(client_id, client_secret),
            timeout=15,
        )
    except httpx.HTTPError as exc:
        raise StreamError(
            f"cannot reach the token service at {token_url} ({type(exc).__name__}): "
            "is `speechgate dev` running?"
        ) from None
    try:
        body = answer.json()
    except ValueError:
        body = {}
    if answer.status_code != 200 or "access_token" not in body:
        reason = body.get("error_description") or body.get("error") or answer.reason_phrase
        raise StreamError(f"the token service refused the client ({answer.status_code}): {reason}")
    return str(body["access_token"])


def _pace(fast: bool) -> Callable[[int], float]:
    """When the byte at `position` may be sent, in seconds from the start."""
    if not fast:
        return lambda position: position / BYTES_PER_S
    return lambda position: max(0.0, (position / BYTES_PER_S - FAST_BURST_S) / FAST_SPEEDUP)


def _refusal(exc: InvalidStatus, relay_url: str) -> StreamError:
    status = exc.response.status_code
    try:
        body = json.loads(exc.response.body or b"{}")
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str) and "message" in body:
        return StreamError(f"the relay refused the stream ({status} {body['error']}: {body['message']})")
    # Not the relay's answer (its refusals are JSON with error and message): another server.
    return StreamError(
        f"{relay_url} answered {status} without the relay's JSON: is it the relay? (the relay URL is "
        "the one `speechgate dev` prints as `relay`; set it with --relay-url)"
    )


async def stream_plain(
    relay_url: str, token: str, audio: Audio, *, fast: bool, language: str, listener: Listener
) -> Result:
    query = f"language={quote(language)}" + ("" if audio.format == "pcm" else f"&format={audio.format}")
    url = f"{relay_url.rstrip('/')}/v1/listen?{query}"
    result = Result(audio_s=audio.audio_s)
    when = _pace(fast)
    try:
        async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            result.started = time.monotonic()

            async def send() -> None:
                reached = 0
                for chunk, position in audio.chunks():
                    delay = result.started + when(reached) - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await ws.send(chunk)
                    result.bytes_sent += len(chunk)
                    result.sent(position)
                    reached = position
                await ws.send(json.dumps({"type": "end"}))

            sender = asyncio.create_task(send())
            try:
                async for message in ws:
                    event = json.loads(message)
                    result.event(event)
                    listener(event)
            finally:
                sender.cancel()
            if ws.close_code != 1000:
                raise StreamError(
                    f"the relay closed the stream: {ws.close_code} {ws.close_reason or ''}".strip()
                )
    except InvalidStatus as exc:
        raise _refusal(exc, relay_url) from None
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else "no close frame"
        reason = exc.rcvd.reason if exc.rcvd else ""
        raise StreamError(f"the relay closed the stream: {code} {reason}".strip()) from None
    except OSError as exc:
        raise StreamError(
            f"cannot reach the relay at {relay_url} ({exc.strerror or type(exc).__name__}): "
            "is `speechgate dev` running?"
        ) from None
    return result


def stream_sdk(
    relay_url: str, token: str, pcm: bytes, *, fast: bool, language: str, listener: Listener
) -> Result:
    """The same through the official Speech SDK (`azure-cognitiveservices-speech`)."""
    try:
        import azure.cognitiveservices.speech as speechsdk
    except ImportError:
        raise StreamError(
            "--sdk needs the Speech SDK: `uv pip install azure-cognitiveservices-speech`"
        ) from None
    config = speechsdk.SpeechConfig(
        endpoint=f"{relay_url.rstrip('/')}{CONVERSATION_PATH}?language={quote(language)}"
    )
    config.authorization_token = token
    audio_format = speechsdk.audio.AudioStreamFormat(samples_per_second=16000, bits_per_sample=16, channels=1)
    push = speechsdk.audio.PushAudioInputStream(stream_format=audio_format)
    recognizer = speechsdk.SpeechRecognizer(
        speech_config=config, audio_config=speechsdk.audio.AudioConfig(stream=push)
    )
    result = Result(audio_s=len(pcm) / BYTES_PER_S)
    done = threading.Event()
    errors: list[str] = []

    def event(kind: str, sdk_result: Any) -> dict[str, Any]:
        return {
            "type": kind,
            "text": sdk_result.text,
            "offset_ms": sdk_result.offset // 10_000,
            "duration_ms": sdk_result.duration // 10_000,
        }

    def recognizing(evt: Any) -> None:
        partial = event("partial", evt.result)
        result.event(partial)
        listener(partial)

    def recognized(evt: Any) -> None:
        if evt.result.reason == speechsdk.ResultReason.RecognizedSpeech and evt.result.text:
            final = event("final", evt.result)
            result.event(final)
            listener(final)

    def canceled(evt: Any) -> None:
        details = evt.cancellation_details
        if details.reason == speechsdk.CancellationReason.Error:
            errors.append(f"the Speech SDK cancelled: {details.code}: {details.error_details}")
        done.set()

    recognizer.recognizing.connect(recognizing)
    recognizer.recognized.connect(recognized)
    recognizer.canceled.connect(canceled)
    recognizer.session_stopped.connect(lambda evt: done.set())
    recognizer.start_continuous_recognition()
    when = _pace(fast)
    result.started = time.monotonic()
    for position in range(0, len(pcm), CHUNK_BYTES):
        delay = result.started + when(position) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        push.write(pcm[position : position + CHUNK_BYTES])
        result.sent(position + CHUNK_BYTES)
    push.close()
    finished = done.wait(60 + result.audio_s)
    recognizer.stop_continuous_recognition()
    if errors:
        raise StreamError(errors[0])
    if not finished:
        raise StreamError("no answer from the relay within a minute of the end of the audio")
    return result
