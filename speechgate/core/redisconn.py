"""Connecting to Redis from a `limits`-style storage URI, and watching whether it is up.

URIs: `redis://`, `rediss://`, `unix://` (optionally with limits' `async+` prefix),
`redis+sentinel://host:port[,host:port]/service`, and `redis+cluster://host:port[,host:port]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool, ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as BrokenConnection
from redis.exceptions import NoScriptError, RedisError, ResponseError

log = logging.getLogger(__name__)

# Both are raised for a server that is down, restarting or unreachable.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)

Redis = aioredis.Redis | RedisCluster

# Short timeouts: a slow Redis must turn into the per-process fallback, not into slow requests.
# One retry, at once and only on a broken connection (a pooled connection to a server that has
# restarted since): a timeout is not retried, since waiting twice would only make requests slow.
_OPTIONS: dict[str, Any] = {
    "socket_timeout": 0.5,
    "socket_connect_timeout": 0.5,
    "retry": Retry(NoBackoff(), 1, supported_errors=(BrokenConnection,)),
}

# What one process holds open to a single server, in use or idle (docs/operations.md budgets
# `maxclients` from it). The client's own pool (everything but the hot scripts, the events
# subscription too) and the scripts (ScriptRunner) each wait for a free connection, as long as a
# command may take, rather than open more. A burst of handshakes once left a relay 95 idle
# connections, and a larger one would have opened one per handshake.
MAX_POOLED = 16
MAX_SCRIPT_CALLS = 48
MAX_PER_PROCESS = MAX_POOLED + MAX_SCRIPT_CALLS


def connect(uri: str, name: str | None = None) -> Redis:
    """A redis-py asyncio client for `uri`; no connection is made until the first command.
    `name` is each connection's CLIENT SETNAME (`CLIENT LIST` tells the relays from the rest)."""
    uri = uri.removeprefix("async+")
    parts = urlsplit(uri)
    if parts.scheme == "rediss+sentinel":
        raise ValueError(
            "rediss+sentinel:// is not supported: the Sentinel and its master would be reached "
            "without TLS; use redis+sentinel:// on a trusted network, or rediss:// to one server"
        )
    if parts.scheme == "redis+sentinel":
        service = parts.path.strip("/")
        if not service:
            raise ValueError("a redis+sentinel:// URI needs the service name as its path")
        auth = _auth(parts.username, parts.password)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            _locations(parts.netloc), sentinel_kwargs=auth, **auth, client_name=name, **_OPTIONS
        )
        master: aioredis.Redis = sentinel.master_for(service)
        return master
    if parts.scheme in ("redis+cluster", "rediss+cluster"):
        nodes = [ClusterNode(host, port) for host, port in _locations(parts.netloc)]
        options: dict[str, Any] = {**_auth(parts.username, parts.password), **_OPTIONS}
        return RedisCluster(
            startup_nodes=nodes,
            ssl=parts.scheme.startswith("rediss"),
            client_name=name,
            max_connections=MAX_POOLED,  # per node
            **options,
        )
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported Redis URI scheme {parts.scheme!r}")
    pool = BlockingConnectionPool.from_url(
        uri, max_connections=MAX_POOLED, timeout=_OPTIONS["socket_timeout"], client_name=name, **_OPTIONS
    )
    return aioredis.Redis.from_pool(pool)


def _auth(username: str | None, password: str | None) -> dict[str, str]:
    auth = {}
    if username:
        auth["username"] = username
    if password:
        auth["password"] = password
    return auth


def _locations(netloc: str) -> list[tuple[str, int]]:
    hosts = netloc.rpartition("@")[2]
    found = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        found.append((host.strip("[]") or "localhost", int(port or 6379)))
    return found


class RedisHealth:
    """Whether Redis answers. Callers mark it down on an error; a probe marks it up again.

    While down, callers skip Redis entirely (no time lost on each request), and one background
    task pings it every `interval` seconds until it answers.
    """

    def __init__(
        self,
        client: Redis | None,
        interval: float = 0.25,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.client = client
        self.interval = interval
        self.up = client is not None
        self.outages = 0  # how often Redis went away
        self._on_change = on_change
        self._probe: asyncio.Task[None] | None = None
        if on_change:
            on_change(self.up)

    def mark_down(self, exc: BaseException) -> None:
        if not self.up or self.client is None:
            return
        self.up = False
        self.outages += 1  # what was written before it may be gone: see relay.admission
        log.warning("redis unreachable (%s); using per-process limits", type(exc).__name__)
        if self._on_change:
            self._on_change(False)
        self._probe = asyncio.get_running_loop().create_task(self._wait_for_redis())

    async def _wait_for_redis(self) -> None:
        assert self.client is not None
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.client.ping()
            except REDIS_ERRORS:
                continue
            self.up = True
            log.warning("redis reachable again; shared limits restored")
            if self._on_change:
                self._on_change(True)
            return

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe


def lua(package: str, name: str) -> str:
    """A Lua script kept as a resource of `package` (its folder lua/), as `limits` keeps its own:
    an editor highlights it, and its comments are Lua's."""
    return resources.files(package).joinpath("lua", name).read_text(encoding="utf-8")


class ScriptRunner:
    """Runs one Lua script per call with as little client work as possible.

    redis-py's `Script` goes through the client's retry wrapper and the pool's lock and health
    checks: measured here at 2-3x the CPU of the command itself, on the token endpoint's hot
    path. For a single server this keeps its own idle list of redis-py connections (one event
    loop, so no lock), shared by every runner of the client (_Scripts), and sends EVALSHA on them
    directly. Sentinel (whose pool finds the master as it hands out connections) and Cluster
    (which routes by slot) go through `Script`.
    """

    def __init__(self, client: Redis, source: str) -> None:
        self.client = client
        self.source = source
        self._script = client.register_script(source)
        self.sha: str = self._script.sha
        # Exactly the plain pools: the Sentinel pool subclasses them, and its make_connection()
        # would connect to the default address instead of the master.
        self._direct = isinstance(client, aioredis.Redis) and type(client.connection_pool) in (
            ConnectionPool,
            BlockingConnectionPool,
        )
        self._shared = _scripts_of(client)

    async def __call__(self, keys: list[str], args: list[int | str]) -> Any:
        if not self._direct:
            return await self._script(keys=keys, args=args)
        shared = self._shared
        if shared.calls.locked():  # the bound reached: wait, as long as a command may take
            async with asyncio.timeout(_OPTIONS["socket_timeout"]):
                await shared.calls.acquire()
        else:
            await shared.calls.acquire()  # at once: no timer on the hot path
        try:
            if shared.idle:
                try:
                    return await self._run(shared.idle.pop(), keys, args)
                except (BrokenConnection, OSError):
                    # An idle connection to a server that has restarted since: so are all the
                    # others. Drop them and try once on a new one, rather than fail a call for each.
                    await self.aclose()
            assert isinstance(self.client, aioredis.Redis)
            return await self._run(self.client.connection_pool.make_connection(), keys, args)  # type: ignore[no-untyped-call]
        finally:
            shared.calls.release()

    async def _run(self, conn: AbstractConnection, keys: list[str], args: list[int | str]) -> Any:
        try:
            await conn.send_command("EVALSHA", self.sha, len(keys), *keys, *args, check_health=False)
            try:
                result = await conn.read_response()
            except NoScriptError:  # a restarted or flushed server: EVAL loads it again
                await conn.send_command("EVAL", self.source, len(keys), *keys, *args, check_health=False)
                result = await conn.read_response()
        except ResponseError:
            self._keep(conn)  # an error answer; the connection itself is fine
            raise
        except BaseException:
            await conn.disconnect()
            raise
        self._keep(conn)
        return result

    def _keep(self, conn: AbstractConnection) -> None:
        self._shared.idle.append(conn)  # no more than MAX_SCRIPT_CALLS: each was one call's

    async def aclose(self) -> None:
        idle, self._shared.idle = self._shared.idle, []
        for conn in idle:
            await conn.disconnect()


class _Scripts:
    """The script connections of one client: at most MAX_SCRIPT_CALLS, in use or kept idle (closing
    some after a burst would only open them again in the next)."""

    def __init__(self) -> None:
        self.calls = asyncio.Semaphore(MAX_SCRIPT_CALLS)
        self.idle: list[AbstractConnection] = []


# Keyed by the client the runners are given (not a global of their own): one budget per client.
_SCRIPTS: weakref.WeakKeyDictionary[Redis, _Scripts] = weakref.WeakKeyDictionary()


def _scripts_of(client: Redis) -> _Scripts:
    shared = _SCRIPTS.get(client)
    if shared is None:
        shared = _SCRIPTS[client] = _Scripts()
    return shared


def redis_up_gauge(registry: CollectorRegistry) -> Gauge:
    """The same gauge on both services; the scrape's job label tells them apart."""
    return Gauge(
        "speechgate_redis_up", "1 while Redis answers, 0 while rules are per-process", registry=registry
    )
