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

from prometheus_client import CollectorRegistry, Gauge

from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import REDIS_ERRORS, Redis

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[None]]


def encode(event: dict[str, Any]) -> str:
    """An event as published on the channel (a script may publish it too)."""
    return json.dumps(event, separators=(",", ":"))


async def publish(redis: Redis, keyspace: Keyspace, event: dict[str, Any]) -> None:
    await redis.publish(keyspace.events, encode(event))


# What /readyz says of a listener that is not subscribed.
NOT_LISTENING = "not subscribed: revocations and changes reach this process late (retrying)"


def events_gauge(registry: CollectorRegistry) -> Gauge:
    """The same gauge on both services: 0 while the event listener is not subscribed."""
    return Gauge(
        "speechgate_events_subscribed",
        "1 while this process listens to revocation and reload events, 0 while it does not",
        registry=registry,
    )


class EventListener:
    """Calls `handler` for every event; subscribes again by itself after any failure (Redis gone,
    a cluster client that has not learned its slots yet, a bug), with a backoff, saying why each
    time. `subscribed` (and the gauge, when given) says whether it is listening now: a listener
    that is not shows on /readyz, since revocations and quota changes then reach this process
    only through their slow fallbacks."""

    MAX_RETRY_S = 10.0

    def __init__(
        self,
        redis: Redis,
        keyspace: Keyspace,
        handler: Handler,
        retry_s: float = 0.25,
        gauge: Gauge | None = None,
    ) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.handler = handler
        self.retry_s = retry_s  # after a Redis error: back soon after Redis is (the probe's pace)
        self.subscribed = asyncio.Event()
        self.gauge = gauge
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._set(False)

    def _set(self, subscribed: bool) -> None:
        (self.subscribed.set if subscribed else self.subscribed.clear)()
        if self.gauge is not None:
            self.gauge.set(1 if subscribed else 0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        backoff = self.retry_s  # for failures that are not Redis's: they double, to MAX_RETRY_S
        failing = False  # said once per run of failures, not once per retry through an outage
        while not self._closing:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # anything: a listener that stops in silence is the worst case
                # redis-py may turn a cancellation into a connection error: stop if closing.
                was_subscribed = self.subscribed.is_set()
                self._set(False)
                if self._closing:
                    return
                if was_subscribed:  # a new run of failures
                    failing, backoff = False, self.retry_s
                redis_error = isinstance(exc, REDIS_ERRORS)
                wait = self.retry_s if redis_error else backoff
                backoff = self.retry_s if redis_error else min(backoff * 2, self.MAX_RETRY_S)
                if was_subscribed or not failing or not redis_error:
                    log.warning(
                        "event subscription %s (%s: %s); retrying every %.2f s",
                        "lost" if was_subscribed else "failed",
                        type(exc).__name__,
                        str(exc)[:200],
                        wait,
                        exc_info=not redis_error,  # a bug: its traceback, in our own log
                    )
                failing = True
                await asyncio.sleep(wait)
                continue
            self._set(False)  # the subscription ended after it had worked: subscribe again
            await asyncio.sleep(self.retry_s)

    async def _listen(self) -> None:
        # A cluster client learns its slots on first use; a subscription needs them first.
        await self.redis.initialize()
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.keyspace.events)
            self._set(True)
            log.info("listening to events on %s", self.keyspace.events)
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
