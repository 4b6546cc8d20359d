"""`speechgate dev` recognizing offline (PocketSphinx behind the relay), as a module's fixture."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.cli import SPEECHGATE, credentials
from tests.support.processes import Process, free_port


@dataclass
class Dev:
    cwd: Path
    env: dict[str, str]
    relay_url: str
    output: str

    def stream(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SPEECHGATE, "stream", *args],
            capture_output=True,
            text=True,
            cwd=self.cwd,
            env={**os.environ, **self.env, **(env or {})},
            timeout=90,
            check=False,
        )


@pytest.fixture(scope="module")
def offline_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    cwd = tmp_path_factory.mktemp("dev")
    env = {"SPEECHGATE_PORT": str(free_port()), "SPEECHGATE_RELAY_PORT": str(free_port())}
    # No REDIS_URL: dev runs a Redis of its own in its state directory, and leaves nothing elsewhere.
    clean = {k: v for k, v in os.environ.items() if k not in ("SPEECH_KEY", "SPEECH_REGION", "REDIS_URL")}
    with Process([SPEECHGATE, "dev"], "Uvicorn running on", env={**clean, **env}, cwd=cwd) as proc:
        yield Dev(cwd, env, f"ws://127.0.0.1:{env['SPEECHGATE_RELAY_PORT']}", "".join(proc.output))


def token(dev: Dev) -> str:
    client_id, secret = credentials(dev.output)
    answer = httpx.post(
        f"http://127.0.0.1:{dev.env['SPEECHGATE_PORT']}/v1/token",
        data={"grant_type": "client_credentials"},
        auth=(client_id, secret),
    )
    return str(answer.json()["access_token"])
