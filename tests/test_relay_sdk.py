"""The official Azure Speech SDK (Python) through the relay, with our JWT as its token."""

from __future__ import annotations

import asyncio
import math
import struct
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import azure.cognitiveservices.speech as speechsdk
import pytest

from relay.server import Relay
from tests.conftest import TokenService
from tests.fake_speech import KEY, FakeSpeech, FakeSpeechServer
from tests.relays import RelayThread
from token_service.claims import AccessClaims, new_jti, sign
from token_service.keys import load_keyring
from token_service.redisconn import connect

RECOGNITION = "/speech/recognition/conversation/cognitiveservices/v1?language=en-US"
INTERACTIVE = "/speech/recognition/interactive/cognitiveservices/v1?language=en-US"
SYNTHESIS = "/cognitiveservices/websocket/v1"


def make_wav(path: Path, seconds: float) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(
            b"".join(struct.pack("<h", int(3000 * math.sin(i / 10))) for i in range(int(16000 * seconds)))
        )
    return path


@dataclass
class Stack:
    service: TokenService
    fake: FakeSpeech
    relay: RelayThread
    wav: Path

    def token(self, client: tuple[str, str], **params: str) -> str:
        response = self.service.token(*client, **params)
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    def expired_token(self, client_id: str) -> str:
        """A genuine token of ours whose `exp` has passed and which never opened a session."""
        ring = asyncio.run(load_keyring(self.service.store))
        now = int(time.time())
        settings = self.service.settings
        claims = AccessClaims(
            iss=settings.issuer,
            aud=settings.audience,
            sub=client_id,
            client_id=client_id,
            scope="speech:recognize speech:synthesize",
            iat=now - 600,
            nbf=now - 600,
            exp=now - 300,
            jti=new_jti(),
            max_session_s=3600,
            lang=("*",),
        )
        return sign(claims, ring.signer)

    def config(self, path: str, token: str | None) -> speechsdk.SpeechConfig:
        config = speechsdk.SpeechConfig(endpoint=f"{self.relay.url}{path}")
        if token is not None:
            config.authorization_token = token
        return config


@pytest.fixture
def stack(start_service: Any, tmp_path: Path, redis_url: str, prefix: str) -> Iterator[Stack]:
    service: TokenService = start_service()
    fake = FakeSpeech()
    with FakeSpeechServer(fake) as speech:
        settings = replace(
            service.settings,
            speech_endpoint=speech.url,
            speech_key=KEY,
            jwks_url=f"{service.url}/.well-known/jwks.json",
            heartbeat_s=0.2,
            idp_jwks_min_refresh_s=0.0,
        )
        relay = Relay(settings, service.store, connect(redis_url))
        with RelayThread(relay) as running:
            yield Stack(service, fake, running, make_wav(tmp_path / "speech.wav", 2.0))


def recognize_once(
    stack: Stack, token: str | None, path: str = INTERACTIVE
) -> speechsdk.SpeechRecognitionResult:
    audio = speechsdk.audio.AudioConfig(filename=str(stack.wav))
    recognizer = speechsdk.SpeechRecognizer(speech_config=stack.config(path, token), audio_config=audio)
    return recognizer.recognize_once()


def test_recognize_once_through_the_relay(stack: Stack) -> None:
    client = stack.service.add_client()
    result = recognize_once(stack, stack.token(client))
    assert result.reason == speechsdk.ResultReason.RecognizedSpeech, result.cancellation_details
    assert result.text == "Hello from the fake service."
    (handshake,) = stack.fake.handshakes
    assert handshake["path"].startswith("/speech/recognition/interactive/cognitiveservices/v1?")
    assert "language=en-US" in handshake["path"]
    headers = {k.lower(): v for k, v in handshake["headers"].items()}
    assert headers["ocp-apim-subscription-key"] == KEY  # the relay's own credential
    assert "authorization" not in headers  # ours never goes upstream
    assert "Authorization" not in handshake["path"]


def test_continuous_recognition_over_several_phrases(stack: Stack) -> None:
    client = stack.service.add_client()
    audio = speechsdk.audio.AudioConfig(filename=str(stack.wav))
    recognizer = speechsdk.SpeechRecognizer(
        speech_config=stack.config(RECOGNITION, stack.token(client)), audio_config=audio
    )
    texts: list[str] = []
    stopped = threading.Event()
    recognizer.recognized.connect(lambda e: texts.append(e.result.text))
    recognizer.session_stopped.connect(lambda e: stopped.set())
    recognizer.canceled.connect(lambda e: stopped.set())
    recognizer.start_continuous_recognition()
    assert stopped.wait(30)
    recognizer.stop_continuous_recognition()
    assert len(texts) >= 2
    assert set(texts) == {"Hello from the fake service."}
    assert stack.fake.audio_bytes == 2 * 32000  # every byte of audio reached Azure


def test_synthesis_through_the_relay(stack: Stack) -> None:
    client = stack.service.add_client()
    synthesizer = speechsdk.SpeechSynthesizer(
        speech_config=stack.config(SYNTHESIS, stack.token(client)), audio_config=None
    )
    result = synthesizer.speak_text_async("hello").get()
    assert result.reason == speechsdk.ResultReason.SynthesizingAudioCompleted
    assert len(result.audio_data) >= 3 * 3200


def _auth_failure(result: speechsdk.SpeechRecognitionResult) -> str:
    assert result.reason == speechsdk.ResultReason.Canceled
    details = result.cancellation_details
    assert details.code == speechsdk.CancellationErrorCode.AuthenticationFailure, details.error_details
    return str(details.error_details)


def test_missing_expired_revoked_and_wrongly_scoped_tokens_fail_authentication(stack: Stack) -> None:
    client = stack.service.add_client()
    assert "401" in _auth_failure(recognize_once(stack, None))
    assert "401" in _auth_failure(recognize_once(stack, stack.expired_token(client[0])))
    assert "403" in _auth_failure(recognize_once(stack, stack.token(client, scope="speech:synthesize")))
    revoked = stack.token(client)
    assert stack.service.http.post("/v1/revoke", auth=client, data={"token": revoked}).status_code == 200
    assert "401" in _auth_failure(recognize_once(stack, revoked))
    assert stack.fake.handshakes == []  # nothing refused ever reached Azure


def test_upstream_gone_cancels_the_turn_with_the_reason(stack: Stack) -> None:
    stack.fake.refuse_status = 503
    client = stack.service.add_client()
    started = time.monotonic()
    result = recognize_once(stack, stack.token(client))
    assert result.reason == speechsdk.ResultReason.Canceled
    assert "Azure Speech unavailable" in result.cancellation_details.error_details
    assert "4000" in result.cancellation_details.error_details
    assert time.monotonic() - started < 15  # a clear cancellation, not a hang
