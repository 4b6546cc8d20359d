"""Events on Redis pub/sub: revocations and key reloads, for every replica at once.

Messages are small JSON objects with a `type`: `{"type": "revoke", "jti": …}`,
`{"type": "reload", "what": "signing-key" | "speech-key" | "client", …}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import REDIS_ERRORS, Redis

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[None]]


def encode(event: dict[str, Any]) -> str:
    """An event as published on the channel (a script may publish it too)."""
    return json.dumps(event, separators=(",", ":"))


async def publish(redis: Redis, keyspace: Keyspace, event: dict[str, Any]) -> None:
    await redis.publish(keyspace.events, encode(event))


class EventListener:
    """Calls `handler` for every event; resubscribes by itself after Redis comes back."""

    def __init__(self, redis: Redis, keyspace: Keyspace, handler: Handler, retry_s: float = 1.0) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.handler = handler
        self.retry_s = retry_s
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._closing:
            try:
                await self._listen()
            except REDIS_ERRORS as exc:
                # redis-py may turn a cancellation into a connection error: stop if closing.
                self.subscribed.clear()
                if self._closing:
                    return
                log.warning("event subscription lost (%s); retrying", type(exc).__name__)
            await asyncio.sleep(self.retry_s)

    async def _listen(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.keyspace.events)
            self.subscribed.set()
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                try:
                    event = json.loads(message["data"])
                except (ValueError, TypeError):
                    log.warning("ignored a malformed event")
                    continue
                if isinstance(event, dict):
                    await self.handler(event)
        finally:
            # Bounded: closing a subscription that is still connecting can wait on its lock.
            with contextlib.suppress(*REDIS_ERRORS, asyncio.CancelledError):
                await asyncio.wait_for(pubsub.aclose(), 1.0)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)
