"""The official JavaScript Speech SDK on the machine's Node.js: the `node` fixture installs the SDK
pinned in tests/js/package-lock.json on first use (npm ci); `run_js` runs tests/js/speech.js."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

# SPEECHGATE_JS_SDK_DIR: a copy of tests/js with another SDK version installed (.ci/run's second
# step runs the compatibility tests on the newest release that way).
JS = Path(os.environ.get("SPEECHGATE_JS_SDK_DIR") or Path(__file__).parent.parent / "js")


@pytest.fixture(scope="session")
def node() -> str:
    binary = shutil.which("node")
    if binary is None or shutil.which("npm") is None:
        pytest.fail("these tests need Node.js and npm (.ci/run installs them)")
    wanted = ("microsoft-cognitiveservices-speech-sdk", "oauth4webapi")  # tests/js/package.json's
    if not all((JS / "node_modules" / name).exists() for name in wanted):
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, capture_output=True, timeout=300
        )
    return binary


def run_js(
    node: str, *args: str, form: str = "endpoint", websocket: str = "ws", env: dict[str, str] | None = None
) -> dict[str, Any]:
    """`node speech.js MODE ENDPOINT TOKEN [WAV]`: its last JSON line. `form`: how the app configures
    the SDK (`endpoint`: fromEndpoint, `host`: fromHost); `websocket`: the npm `ws` package the SDK
    takes in Node, or Node's built-in one (`native`; the SDK then sends its headers in the query,
    as in a browser)."""
    flags = ["--experimental-websocket"] if websocket == "native" else []
    result = subprocess.run(
        [node, *flags, str(JS / "speech.js"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {}), "SPEECH_FORM": form},
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, (result.stdout, result.stderr)
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def sdk_versions() -> str:
    """The Speech SDK versions this run tests, for pytest's header."""
    import azure.cognitiveservices.speech as speechsdk

    package = JS / "node_modules" / "microsoft-cognitiveservices-speech-sdk" / "package.json"
    js = json.loads(package.read_text())["version"] if package.exists() else "not installed yet"
    return f"Speech SDKs: Python {speechsdk.__version__}, JavaScript {js} ({JS})"
