"""The relay in a thread for the tests, beside a token service and a fake Azure Speech service."""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import azure.cognitiveservices.speech as speechsdk
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from speechgate.core.claims import AccessClaims, new_jti, sign
from speechgate.core.keys import load_keyring
from speechgate.core.redisconn import connect
from speechgate.core.runtime import RELAY
from speechgate.relay.server import Relay
from tests.fakes.speech import KEY, FakeSpeech, FakeSpeechServer

if TYPE_CHECKING:
    from tests.support.services import TokenService


class RelayThread:
    """`with RelayThread(relay) as r:` serves the relay at `r.url` on a free loopback port."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.port = 0
        self.server: Any = None  # the websockets Server, once serving: its `connections`
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.relay.running("127.0.0.1", 0) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self.server = server
            self._ready.set()
            await self._stop.wait()
        await self.relay.aclose()

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the relay's loop and wait for its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> RelayThread:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"relay did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


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
def stack_factory(start_service: Any, tmp_path: Path, redis_url: str) -> Iterator[Any]:
    """`stack_factory(**settings)`: a token service, a fake Azure and a relay; stopped after the test."""
    with contextlib.ExitStack() as cleanup:

        def make(service_redis_url: str | None = None, **overrides: Any) -> Stack:
            """`service_redis_url`: the token service's Redis, when not the suite's (a cluster)."""
            service: TokenService = start_service(
                **({"redis_url": service_redis_url} if service_redis_url else {})
            )
            fake = FakeSpeech()
            speech = cleanup.enter_context(FakeSpeechServer(fake))
            defaults: dict[str, Any] = {
                "speech_endpoint": speech.url,
                "speech_key": KEY,
                "jwks_url": f"{service.url}/.well-known/jwks.json",
                "heartbeat_s": 0.2,
                "idp_jwks_min_refresh_s": 0.0,
            }
            settings = replace(service.settings, **{**defaults, **overrides})
            relay = Relay(settings, service.store, connect(settings.redis_url or redis_url, RELAY))
            running = cleanup.enter_context(RelayThread(relay))
            return Stack(service, fake, running, make_wav(tmp_path / "speech.wav", 2.0))

        yield make


@pytest.fixture
def stack(stack_factory: Any) -> Stack:
    made: Stack = stack_factory()
    return made


async def refusal_status(url: str) -> int | None:
    """The status a handshake is refused with; None when it is admitted (it is closed again at once)."""
    try:
        async with ws_connect(url):
            return None
    except InvalidStatus as exc:
        status: int = exc.response.status_code
        return status
