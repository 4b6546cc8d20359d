"""The official JavaScript Speech SDK (Node.js) through the relay, with our JWT as its token.

Installs the SDK pinned in tests/js/package-lock.json on first use (npm ci); the machine's
Node.js runs it. The JS SDK copies the token into the query and, on synthesis, only accepts audio
after a `response` message: both are what this checks beyond the Python SDK.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.relays import Stack

JS = Path(__file__).parent / "js"
RECOGNITION = "/speech/recognition/interactive/cognitiveservices/v1?language=en-US"
SYNTHESIS = "/cognitiveservices/websocket/v1"


@pytest.fixture(scope="session")
def node() -> str:
    binary = shutil.which("node")
    if binary is None or shutil.which("npm") is None:
        pytest.fail("these tests need Node.js and npm (.ci/run installs them)")
    if not (JS / "node_modules" / "microsoft-cognitiveservices-speech-sdk").exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, capture_output=True, timeout=300
        )
    return binary


def run_js(node: str, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [node, str(JS / "speech.js"), *args], capture_output=True, text=True, timeout=60, check=False
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, (result.stdout, result.stderr)
    out: dict[str, Any] = json.loads(lines[-1])
    return out


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


def test_js_sdk_reports_a_refused_token(node: str, stack: Stack) -> None:
    out = run_js(node, "recognize", f"{stack.relay.url}{RECOGNITION}", "not-a-token", str(stack.wav))
    assert out["reason"] == "Canceled"
    assert "401" in out["details"]


def test_js_sdk_cancels_at_once_when_azure_is_gone(node: str, stack: Stack) -> None:
    stack.fake.refuse_status = 503
    token = stack.token(stack.service.add_client())
    out = run_js(node, "recognize", f"{stack.relay.url}{RECOGNITION}", token, str(stack.wav))
    assert out["reason"] == "Canceled"
    assert "Azure Speech unavailable" in out["details"]
