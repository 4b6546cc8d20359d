"""Running the relay in a thread for the tests, beside a token service and a fake Azure."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

from relay.server import Relay


class RelayThread:
    """`with RelayThread(relay) as r:` serves the relay at `r.url` on a free loopback port."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.port = 0
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


@dataclass
class Endpoints:
    recognition: str
    synthesis: str
    plain: str
