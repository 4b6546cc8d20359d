"""The official JavaScript Speech SDK (Node.js) through the relay, with our JWT as its token.

The `node` fixture (tests/support/js_sdk.py) installs the SDK pinned in tests/js/package-lock.json on
first use; the machine's Node.js runs it. The JS SDK copies the token into the query and, on
synthesis, only accepts audio after a `response` message: both are what this checks beyond the
Python SDK.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any

import azure.cognitiveservices.speech as speechsdk
import pytest

from tests.support.js_sdk import JS, run_js
from tests.support.processes import wait_until
from tests.support.relays import Stack

RECOGNITION = "/speech/recognition/interactive/cognitiveservices/v1?language=en-US"
SYNTHESIS = "/cognitiveservices/websocket/v1"


def test_js_sdk_recognizes_through_the_relay(node: str, stack: Stack) -> None:
    token = stack.token(stack.service.add_client())
    out = run_js(node, "recognize", f"{stack.relay.url}{RECOGNITION}", token, str(stack.wav))
    assert out == {"reason": "RecognizedSpeech", "text": "Hello from the fake service."}
    upstream = stack.fake.handshakes[-1]
    assert token not in upstream["path"]
    assert "Authorization" not in upstream["path"]


def test_js_sdk_synthesizes_through_the_relay(node: str, stack: Stack) -> None:
    token = stack.token(stack.service.add_client())
    out = run_js(node, "synthesize", f"{stack.relay.url}{SYNTHESIS}", token)
    assert out["reason"] == "SynthesizingAudioCompleted"
    assert out["bytes"] >= 3 * 3200


def test_js_sdk_cancels_a_synthesis_azure_refuses_at_once_with_its_reason(node: str, stack: Stack) -> None:
    stack.fake.refuse_ssml = (1007, "Unsupported voice en-US-NoSuchNeural.")
    token = stack.token(stack.service.add_client())
    started = time.monotonic()
    out = run_js(node, "synthesize", f"{stack.relay.url}{SYNTHESIS}", token)
    assert out["reason"] == "Canceled"
    assert "Unsupported voice en-US-NoSuchNeural." in out["details"]
    assert stack.fake.connections == 1
    assert time.monotonic() - started < 10  # not the SDK's wait for a reconnect


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("missing", "401"),
        ("expired", "401"),
        ("revoked", "401"),
        ("wrongly scoped", "403"),
        ("malformed", "401"),
    ],
)
def test_js_sdk_reports_a_refused_token(node: str, stack: Stack, kind: str, status: str) -> None:
    client = stack.service.add_client()
    if kind == "missing":
        token = ""
    elif kind == "expired":
        token = stack.expired_token(client[0])
    elif kind == "revoked":
        token = stack.token(client)
        assert stack.service.http.post("/v1/revoke", auth=client, data={"token": token}).status_code == 200
    elif kind == "wrongly scoped":
        token = stack.token(client, scope="speech:synthesize")
    else:
        token = "not-a-token"
    out = run_js(node, "recognize", f"{stack.relay.url}{RECOGNITION}", token, str(stack.wav))
    assert out["reason"] == "Canceled"
    assert status in out["details"]
    assert stack.fake.handshakes == []  # nothing refused reaches Azure


def test_js_sdk_cancels_at_once_when_azure_is_gone(node: str, stack: Stack) -> None:
    stack.fake.refuse_status = 503
    token = stack.token(stack.service.add_client())
    out = run_js(node, "recognize", f"{stack.relay.url}{RECOGNITION}", token, str(stack.wav))
    assert out["reason"] == "Canceled"
    assert "Azure Speech unavailable" in out["details"]


def _hold(node: str, stack: Stack, token: str, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [node, str(JS / "speech.js"), "hold", f"{stack.relay.url}{RECOGNITION}", token, str(seconds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "streaming"
    return proc


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=30)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, (out, err)
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def test_js_sdk_cancels_at_once_when_its_token_is_revoked_mid_turn(node: str, stack: Stack) -> None:
    stack.fake.phrase_every_s = 60.0  # the turn stays open
    client = stack.service.add_client()
    token = stack.token(client)
    proc = _hold(node, stack, token, 0.5)
    assert wait_until(lambda: stack.fake.audio_bytes > 0)
    started = time.monotonic()
    assert stack.service.http.post("/v1/revoke", auth=client, data={"token": token}).status_code == 200
    out = _result(proc)
    assert out["reason"] == "Canceled"
    assert "token revoked" in out["details"]
    assert time.monotonic() - started < 5  # a cancellation, not the 20 s hang the script waits for


def test_js_sdk_cancels_at_once_when_the_quota_runs_out_mid_turn(node: str, stack: Stack) -> None:
    stack.fake.phrase_every_s = 60.0
    token = stack.token(stack.service.add_client(audio_s_per_day_subject=1))
    out = _result(_hold(node, stack, token, 1.5))
    assert out["reason"] == "Canceled"
    assert "daily audio quota used up" in out["details"]


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "message-path"])
def test_a_draining_relay_lets_a_js_turn_finish(node: str, stack_factory: Any, splice: bool) -> None:
    """The JavaScript SDK writes `Path: speech.context` (a space after the colon): the relay must
    see its turn start, or a drain would cut the turn instead of waiting for its end; and it
    closes only after the SDK's telemetry, whose failed send the SDK would report as an error."""
    stack: Stack = stack_factory(splice=splice)
    stack.fake.phrase_every_s = 60.0  # the turn stays open until the app ends its audio
    proc = _hold(node, stack, stack.token(stack.service.add_client()), 0.5)
    assert wait_until(lambda: stack.fake.audio_bytes > 0)
    (live,) = stack.relay.relay.live.values()
    assert live.in_turn
    assert proc.stdin is not None
    draining = threading.Thread(target=stack.relay.call, args=(stack.relay.relay.drain(),))
    draining.start()
    assert wait_until(lambda: live.drain_after_turn)
    assert live.stream.closing_reason is None  # still streaming: the turn has not ended
    proc.stdin.write("end\n")  # the app ends its audio: the turn ends, then the stream
    proc.stdin.flush()
    out = _result(proc)
    draining.join(30)
    assert out == {"reason": "RecognizedSpeech", "text": stack.fake.text}
    assert live.code == 1001


def test_a_draining_relay_lets_a_js_and_a_python_continuous_turn_finish(node: str, stack: Stack) -> None:
    """SIGTERM's drain with a JavaScript and a Python app each mid-turn: both turns end with their
    result, and only then is each stream closed (1001)."""
    stack.fake.phrase_every_s = 60.0  # the turns stay open until the apps end their audio
    js = _hold(node, stack, stack.token(stack.service.add_client()), 0.5)
    config = stack.config(
        "/speech/recognition/conversation/cognitiveservices/v1?language=en-US",
        stack.token(stack.service.add_client()),
    )
    push = speechsdk.audio.PushAudioInputStream()
    python = speechsdk.SpeechRecognizer(config, audio_config=speechsdk.audio.AudioConfig(stream=push))
    texts: list[str] = []
    stopped = threading.Event()
    python.recognized.connect(lambda e: texts.append(e.result.text))
    python.session_stopped.connect(lambda e: stopped.set())
    python.canceled.connect(lambda e: stopped.set())
    python.start_continuous_recognition_async().get()
    push.write(b"\1\0" * 8000)
    assert wait_until(
        lambda: len(stack.relay.relay.live) == 2 and all(x.in_turn for x in stack.relay.relay.live.values())
    )
    lives = list(stack.relay.relay.live.values())
    draining = threading.Thread(target=stack.relay.call, args=(stack.relay.relay.drain(),))
    draining.start()
    assert wait_until(lambda: all(x.drain_after_turn for x in lives))
    assert all(x.stream.closing_reason is None for x in lives)  # both still mid-turn
    assert js.stdin is not None
    js.stdin.write("end\n")
    js.stdin.flush()
    push.close()
    assert _result(js) == {"reason": "RecognizedSpeech", "text": stack.fake.text}
    assert stopped.wait(30)
    python.stop_continuous_recognition_async().get()
    draining.join(30)
    assert texts == [stack.fake.text]
    assert [x.code for x in lives] == [1001, 1001]
