"""The official Azure Speech SDK (Python) through the relay, with our JWT as its token."""

from __future__ import annotations

import threading
import time
from typing import Any

import azure.cognitiveservices.speech as speechsdk
import pytest
import redis

from speechgate.core.keyspace import Keyspace, day
from speechgate.core.upstreams import Upstream, save_pool
from tests.fakes.speech import KEY
from tests.support.processes import wait_until
from tests.support.relays import Stack

RECOGNITION = "/speech/recognition/conversation/cognitiveservices/v1?language=en-US"
INTERACTIVE = "/speech/recognition/interactive/cognitiveservices/v1?language=en-US"
SYNTHESIS = "/cognitiveservices/websocket/v1"


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


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "message-path"])
def test_azure_refusing_a_synthesis_cancels_at_once_with_its_reason(stack_factory: Any, splice: bool) -> None:
    stack: Stack = stack_factory(splice=splice)
    stack.fake.refuse_ssml = (1007, "Unsupported voice en-US-NoSuchNeural.")
    config = stack.config(SYNTHESIS, stack.token(stack.service.add_client()))
    config.speech_synthesis_voice_name = "en-US-NoSuchNeural"
    synthesizer = speechsdk.SpeechSynthesizer(speech_config=config, audio_config=None)
    result = synthesizer.speak_text_async("hello").get()
    assert result.reason == speechsdk.ResultReason.Canceled
    details = result.cancellation_details
    assert details.error_code == speechsdk.CancellationErrorCode.BadRequest, details.error_details
    assert "Unsupported voice en-US-NoSuchNeural." in details.error_details  # Azure's own words
    assert stack.fake.connections == 1  # not retried: it would be refused again


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
    # Azure's own answer, whole: the close reason has room for it.
    assert (
        "Azure Speech unavailable: refused with 503: refused by the fake"
        in result.cancellation_details.error_details
    )
    assert "4000" in result.cancellation_details.error_details
    assert time.monotonic() - started < 15  # a clear cancellation, not a hang


def _push_recognizer(stack: Stack, token: str, path: str) -> tuple[Any, Any]:
    push = speechsdk.audio.PushAudioInputStream()
    recognizer = speechsdk.SpeechRecognizer(
        speech_config=stack.config(path, token), audio_config=speechsdk.audio.AudioConfig(stream=push)
    )
    return push, recognizer


def test_revocation_mid_turn_cancels_the_sdk_at_once_with_the_reason(stack: Stack) -> None:
    client = stack.service.add_client()
    token = stack.token(client)
    push, recognizer = _push_recognizer(stack, token, INTERACTIVE)
    future = recognizer.recognize_once_async()
    push.write(b"\x01\x00" * 8000)  # half a second: no phrase yet, the turn stays open
    assert wait_until(lambda: stack.fake.audio_bytes > 0)
    started = time.monotonic()
    assert stack.service.http.post("/v1/revoke", auth=client, data={"token": token}).status_code == 200
    result = future.get()
    assert result.reason == speechsdk.ResultReason.Canceled
    assert "token revoked" in result.cancellation_details.error_details
    assert "4000" in result.cancellation_details.error_details
    assert time.monotonic() - started < 5  # cancelled, not hanging
    push.close()


def test_azure_closing_the_connection_does_not_break_a_continuous_session(stack: Stack) -> None:
    stack.fake.close_after_s = 0.6  # as Azure does after ~10 minutes
    client = stack.service.add_client()
    push, recognizer = _push_recognizer(stack, stack.token(client), RECOGNITION)
    texts: list[str] = []
    errors: list[str] = []
    stopped = threading.Event()
    recognizer.recognized.connect(lambda e: texts.append(e.result.text))
    recognizer.canceled.connect(lambda e: errors.append(str(e.cancellation_details.error_details)))
    recognizer.session_stopped.connect(lambda e: stopped.set())
    recognizer.start_continuous_recognition()
    for _ in range(25):  # 2.5 s of microphone audio, in real time
        push.write(b"\x01\x00" * 1600)
        time.sleep(0.1)
    push.close()
    assert stopped.wait(30)
    recognizer.stop_continuous_recognition()
    assert stack.fake.connections >= 2  # the session crossed an upstream close
    assert texts
    assert [e for e in errors if e] == []
    # The SDK replayed the audio after its last phrase on each new connection: counted once.
    keys = Keyspace(stack.service.settings.redis_prefix)
    with redis.Redis.from_url(stack.service.settings.redis_url or "") as db:
        assert wait_until(lambda: db.zcard(keys.lease_client(client[0])) == 0)  # released: all counted
        assert float(db.get(keys.audio_client(client[0], day())) or 0) == pytest.approx(2.5, abs=0.01)


def test_quota_used_up_mid_turn_cancels_the_sdk_with_the_reason(stack: Stack) -> None:
    stack.fake.phrase_every_s = 60.0  # the turn stays open: no phrase until the audio ends
    client = stack.service.add_client(audio_s_per_day_subject=1)
    push, recognizer = _push_recognizer(stack, stack.token(client), INTERACTIVE)
    future = recognizer.recognize_once_async()
    push.write(b"\x01\x00" * 24000)  # one and a half seconds: the daily second is used up
    result = future.get()
    assert result.reason == speechsdk.ResultReason.Canceled
    assert "daily audio quota used up" in result.cancellation_details.error_details
    assert "4000" in result.cancellation_details.error_details
    push.close()


def accept_entra_tokens(stack: Stack, vault: Any, resource: str) -> None:
    """The fake Azure takes no key, and takes every token the identity endpoint issues (now and
    later) as Speech's `aad#<resource>#<token>`."""
    stack.fake.key = "no key is accepted"
    stack.fake.bearer_tokens = {f"aad#{resource}#{t}" for t in vault.fake.tokens}

    class Tokens(set[str]):
        def add(self, token: str) -> None:
            super().add(token)
            stack.fake.bearer_tokens.add(f"aad#{resource}#{token}")

    vault.fake.tokens = Tokens(vault.fake.tokens)


def recognized_keyless(stack: Stack, resource: str) -> None:
    """A recognition through the SDK works, and reached Azure with the resource's token, no key."""
    result = recognize_once(stack, stack.token(stack.service.add_client()))
    assert result.reason == speechsdk.ResultReason.RecognizedSpeech, result.cancellation_details
    headers = {k.lower(): v for k, v in stack.fake.handshakes[-1]["headers"].items()}
    assert headers["authorization"].startswith(f"Bearer aad#{resource}#")
    assert "ocp-apim-subscription-key" not in headers


def test_an_upstream_of_the_pool_reached_keyless_with_entra_id(stack_factory: Any, vault: Any) -> None:
    """The pool's own Entra ID credentials (its resource's id), not the configured key."""
    resource = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.CognitiveServices/accounts/pooled"
    stack: Stack = stack_factory()
    accept_entra_tokens(stack, vault, resource)
    relay = stack.relay.relay
    pooled = Upstream(
        "keyless", 10, endpoint=relay.settings.speech_endpoint, auth="entra", resource_id=resource
    )
    stack.relay.call(save_pool(relay.store, [pooled], "test"))
    stack.relay.call(relay.pool.load())
    recognized_keyless(stack, resource)


def test_keyless_entra_id_upstream_through_managed_identity(stack_factory: Any, vault: Any) -> None:
    resource = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.CognitiveServices/accounts/speech"
    stack: Stack = stack_factory(upstream_auth="entra", speech_resource_id=resource, speech_key=None)
    accept_entra_tokens(stack, vault, resource)
    recognized_keyless(stack, resource)
