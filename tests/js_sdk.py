"""The official JavaScript Speech SDK on the machine's Node.js: the `node` fixture installs the SDK
pinned in tests/js/package-lock.json on first use (npm ci); `run_js` runs tests/js/speech.js."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

JS = Path(__file__).parent / "js"


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
    """`node speech.js recognize|synthesize ENDPOINT TOKEN [WAV]`: its last JSON line."""
    result = subprocess.run(
        [node, str(JS / "speech.js"), *args], capture_output=True, text=True, timeout=60, check=False
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, (result.stdout, result.stderr)
    out: dict[str, Any] = json.loads(lines[-1])
    return out
