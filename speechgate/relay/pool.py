"""Streams over the upstream pool (core/upstreams.py): which Azure Speech resource each goes to.

At the handshake (`Pool.assign`) a stream goes to the eligible upstream (active, serving its
service and language, in the client's zones) with the fewest live streams against its limit,
counted for the whole fleet in Redis: lua/route.lua chooses and takes the slot in one call. A slot
is a lease like a stream's own (sessions.py): the heartbeat renews it, the stream's end gives it
back, and the slots of a relay that died come back when their leases lapse.

An upstream that refuses (429, 5xx, an auth failure, no connection) is marked down for
`backoff_s`, through Redis for the whole fleet: new streams avoid it, and the stream that met the
refusal moves to another upstream of the same zones (its candidates are its client's zones' only,
so it never leaves them). Without Redis (development, or while it is down) the same rules hold in
this process.

An empty pool is the relay's configured upstream alone, without a limit, as before the pool:
`assign` is not called, and a handshake costs no Redis call more.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import REDIS_ERRORS, Redis, RedisHealth, ScriptRunner, lua
from speechgate.core.settings import Settings
from speechgate.core.store import SecretStore, StoreError
from speechgate.core.upstreams import Upstream, key_secret, load_pool
from speechgate.relay.metrics import RelayMetrics
from speechgate.relay.upstream import (
    Credentials,
    EntraCredentials,
    KeyCredentials,
    UpstreamError,
    upstream_url,
)

log = logging.getLogger("speechgate.relay.pool")


@dataclass(frozen=True)
class Want:
    """What a stream needs of an upstream."""

    service: str  # stt, tts or s2s
    language: str | None  # None: not known at the handshake (universal v2 says it later)
    zones: tuple[str, ...]  # the client's; empty: any


def candidates(pool: Iterable[Upstream], want: Want, exclude: Iterable[str] = ()) -> list[Upstream]:
    """The upstreams that may take a stream, in the pool's order."""
    excluded = set(exclude)
    return [
        u
        for u in pool
        if u.state == "active"
        and u.name not in excluded
        and u.serves(want.service, want.language)
        and (not want.zones or u.zone in want.zones)
    ]


def marks_down(error: UpstreamError) -> bool:
    """A refusal that says the upstream cannot take streams now, not that this request was wrong."""
    return error.status is None or error.status in (401, 403, 429) or error.status >= 500


REFUSAL_REASONS = ("throttled", "error", "auth", "unreachable")


def refusal_reason(error: UpstreamError) -> str:
    """A bounded label for a refusal."""
    if error.status is None:
        return "unreachable"
    if error.status == 429:
        return "throttled"
    if error.status in (401, 403):
        return "auth"
    return "error"


class NoUpstream(Exception):
    """No upstream may take the stream: `why` is "full", "down" or "none" (none eligible)."""

    def __init__(self, why: str, retry_after_s: int) -> None:
        super().__init__(why)
        self.why = why
        self.retry_after_s = retry_after_s


@dataclass
class Placement:
    """A stream's upstream and its slot there."""

    upstream: Upstream
    credentials: Credentials
    stream_id: str
    want: Want
    tried: set[str] = field(default_factory=set)
    in_redis: bool = True  # where its slot is counted

    def url(self, settings: Settings, path_for: Callable[[bool], str], query: str) -> str:
        """`path_for(custom_endpoint)`: the path, which differs on a custom domain."""
        if self.upstream.configured:
            return upstream_url(settings, self.want.service, path_for(bool(settings.speech_endpoint)), query)
        path = path_for(bool(self.upstream.endpoint))
        return f"{self.upstream.base_url(self.want.service)}{path}" + (f"?{query}" if query else "")


class Pool:
    """The relay's view of the pool: definitions, credentials, slots and health."""

    def __init__(
        self,
        settings: Settings,
        store: SecretStore,
        redis: Redis | None,
        keyspace: Keyspace,
        health: RedisHealth,
        configured: Credentials,
        metrics: RelayMetrics,
        backoff_s: float,
    ) -> None:
        self.settings, self.store, self.redis, self.keys = settings, store, redis, keyspace
        self.health, self.configured, self.metrics = health, configured, metrics
        self.backoff_s = backoff_s
        self.lease_ms = int(settings.lease_s * 1000)
        self.upstreams: list[Upstream] = []
        self._credentials: dict[str, tuple[Upstream, Credentials]] = {}
        self._route = ScriptRunner(redis, lua(__package__, "route.lua")) if redis is not None else None
        # This process's own counts and health marks, for when Redis does not answer.
        self._local: dict[str, dict[str, float]] = {}  # upstream -> stream id -> lease end (s)
        self._down: dict[str, float] = {}  # upstream -> marked down until (monotonic s)

    @property
    def active(self) -> bool:
        return bool(self.upstreams)

    async def load(self) -> None:
        """Read the pool again (start-up, the reload event, and every client-cache period); on a
        store error keep the pool held."""
        try:
            pool = await load_pool(self.store)
        except (StoreError, ValueError) as exc:
            log.warning("the upstream pool cannot be read (%s); keeping the one held", exc)
            return
        self.upstreams = pool
        for name in set(self._credentials) - {u.name for u in pool}:
            await self._credentials.pop(name)[1].aclose()
            for gauge in (
                self.metrics.upstream_streams,
                self.metrics.upstream_limit,
                self.metrics.upstream_healthy,
            ):
                with contextlib.suppress(KeyError):
                    gauge.remove(name)
            for reason in REFUSAL_REASONS:
                with contextlib.suppress(KeyError):
                    self.metrics.upstream_refusals.remove(name, reason)
        for upstream in pool:
            held = self._credentials.get(upstream.name)
            if held is None or (held[0].auth, held[0].resource_id) != (upstream.auth, upstream.resource_id):
                if held is not None:
                    await held[1].aclose()
                self._credentials[upstream.name] = (upstream, self._new_credentials(upstream))
            # Its series from the start, not from its first refusal or heartbeat: a panel on them
            # reads 0 (healthy: 1, as routing takes it until it is marked down), not "no data".
            for reason in REFUSAL_REASONS:
                self.metrics.upstream_refusals.labels(upstream.name, reason)
            if held is None:  # new here; the heartbeat brings the fleet-wide figures
                self.metrics.upstream_streams.labels(upstream.name)
                self.metrics.upstream_healthy.labels(upstream.name).set(1)
            # What it offers new streams: nothing while it drains or is disabled.
            self.metrics.upstream_limit.labels(upstream.name).set(
                upstream.limit if upstream.state == "active" else 0
            )

    def _new_credentials(self, upstream: Upstream) -> Credentials:
        if upstream.configured:
            return _Shared(self.configured)  # the relay's own, closed with the relay
        if upstream.auth == "entra":
            assert upstream.resource_id is not None  # Upstream.check makes sure
            return EntraCredentials(upstream.resource_id)
        return KeyCredentials(self.store, None, secret=key_secret(upstream.name))

    def credentials_changed(self) -> None:
        """A key was rotated: read every upstream's key again."""
        for _, credentials in self._credentials.values():
            credentials.invalidate()

    def alternatives(self, placement: Placement) -> list[Upstream]:
        """The other upstreams the stream could move to (down or full ones included)."""
        return candidates(self.upstreams, placement.want, placement.tried | {placement.upstream.name})

    async def assign(self, stream_id: str, want: Want, exclude: Iterable[str] = ()) -> Placement:
        """A slot on the least used eligible upstream, or NoUpstream."""
        chosen = candidates(self.upstreams, want, exclude)
        if not chosen:
            raise NoUpstream("none", 0)
        random.shuffle(chosen)  # ties go to any of them, not always to the pool's first
        if self._route is not None and self.health.up:
            try:
                return await self._assign_redis(stream_id, want, chosen, exclude)
            except REDIS_ERRORS as exc:
                self.health.mark_down(exc)
        return self._assign_local(stream_id, want, chosen, exclude)

    async def _assign_redis(
        self, stream_id: str, want: Want, chosen: Sequence[Upstream], exclude: Iterable[str]
    ) -> Placement:
        assert self._route is not None
        now = int(time.time() * 1000)
        keys = [
            key for u in chosen for key in (self.keys.upstream_live(u.name), self.keys.upstream_down(u.name))
        ]
        index, why = await self._route(
            keys, [now, now + self.lease_ms, stream_id, *(u.limit for u in chosen)]
        )
        if not index:
            why = why.decode() if isinstance(why, bytes) else str(why)
            raise NoUpstream(why, self._retry_after(why))
        return self._route_to(chosen[int(index) - 1], stream_id, want, exclude, in_redis=True)

    def _assign_local(
        self, stream_id: str, want: Want, chosen: Sequence[Upstream], exclude: Iterable[str]
    ) -> Placement:
        now, clock = time.time(), time.monotonic()
        best: Upstream | None = None
        best_use = 0.0
        up = False
        for upstream in chosen:
            if self._down.get(upstream.name, 0.0) > clock:
                continue
            up = True
            live = self._local.setdefault(upstream.name, {})
            for lapsed in [s for s, until in live.items() if until <= now]:
                del live[lapsed]
            use = len(live) / upstream.limit
            if len(live) < upstream.limit and (
                best is None
                or use < best_use
                or (use == best_use and len(live) < len(self._local[best.name]))
            ):
                best, best_use = upstream, use
        if best is None:
            why = "full" if up else "down"
            raise NoUpstream(why, self._retry_after(why))
        self._local[best.name][stream_id] = now + self.settings.lease_s
        return self._route_to(best, stream_id, want, exclude, in_redis=False)

    def _route_to(
        self, upstream: Upstream, stream_id: str, want: Want, exclude: Iterable[str], in_redis: bool
    ) -> Placement:
        credentials = self._credentials[upstream.name][1]
        return Placement(upstream, credentials, stream_id, want, set(exclude), in_redis)

    def _retry_after(self, why: str) -> int:
        return max(1, round(self.backoff_s)) if why == "down" else max(1, round(self.settings.heartbeat_s))

    async def release(self, placement: Placement) -> None:
        """The stream ended (or never started): its slot is free."""
        self._local.get(placement.upstream.name, {}).pop(placement.stream_id, None)
        if placement.in_redis and self.redis is not None:
            try:
                await self.redis.zrem(self.keys.upstream_live(placement.upstream.name), placement.stream_id)
            except REDIS_ERRORS as exc:
                self.health.mark_down(exc)  # the lease lapses on its own

    async def failed(self, placement: Placement, error: UpstreamError) -> Placement | None:
        """The stream's upstream refused: mark it down when the refusal says so, free the slot,
        and find the stream another upstream of its zones; None when there is none."""
        name = placement.upstream.name
        self.metrics.upstream_refusals.labels(name, refusal_reason(error)).inc()
        if not marks_down(error):
            return None
        log.warning("upstream %s refused (%s): marked down for %.0f s", name, error, self.backoff_s)
        await self.mark_down(name)
        await self.release(placement)
        try:
            return await self.assign(placement.stream_id, placement.want, placement.tried | {name})
        except NoUpstream:
            return None

    async def mark_down(self, name: str) -> None:
        self._down[name] = time.monotonic() + self.backoff_s
        self.metrics.upstream_healthy.labels(name).set(0)
        if self.redis is not None and self.health.up:
            try:
                await self.redis.set(self.keys.upstream_down(name), "1", px=int(self.backoff_s * 1000))
            except REDIS_ERRORS as exc:
                self.health.mark_down(exc)

    async def renew(self, placements: Iterable[Placement]) -> None:
        """The heartbeat: renew this relay's slots, and read each upstream's fleet-wide use and
        health into the metrics. One pipeline, whatever the number of streams."""
        if not self.upstreams:
            return
        now = time.time()
        held = list(placements)
        for placement in held:
            if (
                placement.upstream.name in self._local
                and placement.stream_id in self._local[placement.upstream.name]
            ):
                self._local[placement.upstream.name][placement.stream_id] = now + self.settings.lease_s
        if self.redis is None or not self.health.up:
            self._local_gauges()
            return
        until = int(now * 1000) + self.lease_ms
        names = {placement.upstream.name for placement in held}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for placement in held:  # re-added when they were counted here during an outage
                    pipe.zadd(self.keys.upstream_live(placement.upstream.name), {placement.stream_id: until})
                    placement.in_redis = True
                for name in names:  # removed ones too
                    pipe.pexpire(self.keys.upstream_live(name), self.lease_ms + 60_000)
                for upstream in self.upstreams:
                    live = self.keys.upstream_live(upstream.name)
                    pipe.zremrangebyscore(live, "-inf", int(now * 1000))
                    pipe.zcard(live)
                    pipe.exists(self.keys.upstream_down(upstream.name))
                results = await pipe.execute()
        except REDIS_ERRORS as exc:
            self.health.mark_down(exc)
            return
        counts = results[len(held) + len(names) :]
        for i, upstream in enumerate(self.upstreams):
            self.metrics.upstream_streams.labels(upstream.name).set(counts[3 * i + 1])
            self.metrics.upstream_healthy.labels(upstream.name).set(0 if counts[3 * i + 2] else 1)

    def _local_gauges(self) -> None:
        clock = time.monotonic()
        for upstream in self.upstreams:
            self.metrics.upstream_streams.labels(upstream.name).set(len(self._local.get(upstream.name, {})))
            healthy = self._down.get(upstream.name, 0.0) <= clock
            self.metrics.upstream_healthy.labels(upstream.name).set(1 if healthy else 0)

    async def aclose(self) -> None:
        for _, credentials in self._credentials.values():
            await credentials.aclose()
        self._credentials.clear()


class _Shared:
    """The relay's configured credentials, used by the pool without closing them."""

    def __init__(self, inner: Credentials) -> None:
        self.inner = inner

    async def headers(self) -> dict[str, str]:
        return await self.inner.headers()

    def invalidate(self) -> None:
        self.inner.invalidate()

    async def aclose(self) -> None:
        return None
