"""The relay: `Relay(settings, store, redis)`, a WebSocket server with two front doors.

Everything a stream must satisfy is checked at the handshake, before the upgrade (admission.py),
so that the Speech SDKs surface a clean 401/403/429. After the upgrade, the doors (doors/) forward
frames and only peek at what they must: audio payload sizes (metering) and turn boundaries (close
codes, drain).

Size: this is the one owner of the relay's state over a stream's life (admitted, live, ended,
settled in Redis), its heartbeat and its drain; the parts that need no state of their own are
apart (admission, doors, splice, sessions), and what is left shares that state too much to split.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from speechgate.core import foundation
from speechgate.core.clients import ClientPolicy
from speechgate.core.events import NOT_LISTENING, EventListener
from speechgate.core.redisconn import REDIS_ERRORS, Redis
from speechgate.core.revocation import SIGNING_KEY_REVOKED, Revocations
from speechgate.core.settings import Settings
from speechgate.core.speechkeys import sts_base_for
from speechgate.core.store import SecretStore, StoreError
from speechgate.relay import doors, libopus, opus
from speechgate.relay.admission import Gatekeeper
from speechgate.relay.auth import (
    Authenticator,
    Refusal,
    plain_path,
    split_target,
)
from speechgate.relay.doors import azure, plain
from speechgate.relay.http import Route, asks_for_upgrade, json_response, respond
from speechgate.relay.live import Live, Pending
from speechgate.relay.metrics import KNOWN_CLOSE_CODES, RelayMetrics
from speechgate.relay.pool import Placement, Pool
from speechgate.relay.sessions import MemorySessions, RedisSessions, Stream
from speechgate.relay.upstream import (
    Credentials,
    EntraCredentials,
    KeyCredentials,
    StsCredentials,
)
from speechgate.relay.voices import VOICES_PATHS, VoiceList

log = logging.getLogger("speechgate.relay")
# websockets logs request lines (with their query, where tokens may be) at DEBUG: never below INFO.
_ws_log = logging.getLogger("speechgate.relay.websockets")
_ws_log.setLevel(logging.INFO)

HANDSHAKE_ERRORS: tuple[type[BaseException], ...] = (StoreError, *REDIS_ERRORS)
MAX_UNSETTLED = 100_000  # ended streams kept for Redis during an outage (a few hundred bytes each)


class Relay:
    def __init__(
        self,
        settings: Settings,
        store: SecretStore,
        redis: Redis | None,
        *,
        http: httpx.AsyncClient | None = None,
        registry: CollectorRegistry | None = None,
        revocations: Revocations | None = None,
        routes: Mapping[str, Route] | None = None,
        upstream_name: str = "Azure Speech",  # what the apps are told closed or failed
    ) -> None:
        self.settings = settings
        self.upstream_name = upstream_name
        self.routes = dict(routes or {})
        self.metrics = RelayMetrics(registry or CollectorRegistry())
        shared = foundation.build(
            settings, store, redis, self.metrics.redis_up, http=http, revocations=revocations
        )
        self.store, self.redis, self.http, self.keyspace = store, redis, shared.http, shared.keyspace
        self.auth = Authenticator(settings, shared.jwks_cache)
        self.clients = shared.clients
        # Shared rules in Redis; while Redis does not answer (or without it, in development) the
        # same rules hold in this process only, and a probe switches back when Redis returns.
        self.health = shared.health
        self.local_sessions = MemorySessions(settings.lease_s)
        self.redis_sessions = RedisSessions(redis, self.keyspace, settings.lease_s) if redis else None
        self.revocations = shared.revocations
        key = KeyCredentials(store, settings.speech_key)
        self.credentials: Credentials = key
        if settings.upstream_auth == "entra":
            assert settings.speech_resource_id is not None  # Settings.validate makes sure
            self.credentials = EntraCredentials(settings.speech_resource_id)
        if settings.upstream_auth == "sts":
            self.credentials = StsCredentials(key, sts_base_for(settings.speech_region, None), self.http)
        self.voices = VoiceList(settings, self.credentials, self.http)
        self.pool = Pool(
            settings,
            store,
            redis,
            self.keyspace,
            self.health,
            self.credentials,
            self.metrics,
            settings.upstream_backoff_s,
        )
        self.libopus: libopus.Library | None = opus.native()
        # Long chunks of Opus are decoded here: the decoders run without the GIL.
        self.workers: Executor = ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="decode"
        )
        self.gate = Gatekeeper(
            self.auth,
            self.clients,
            self.revocations,
            self.health,
            self.local_sessions,
            self.redis_sessions,
            self.voices,
            self.pool,
            has_redis=redis is not None,
            live_streams=lambda: [live.stream for live in self.live.values()],
            write_leases=self.heartbeat,
        )
        self.live: dict[str, Live] = {}
        self.unsettled: list[Stream] = []  # ended streams whose last state Redis has yet to get
        self.draining = False
        self._pending: dict[uuid.UUID, Pending] = {}
        self._listener = (
            EventListener(redis, self.keyspace, self.on_event, gauge=self.metrics.events_subscribed)
            if redis
            else None
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._releasing: set[asyncio.Future[None]] = set()

    # --- the handshake ----------------------------------------------------------------------

    async def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path, params = split_target(request.path)
        if not plain_path(path):
            return json_response(
                connection,
                400,
                {
                    "error": "invalid_path",
                    "message": "the path has empty or dot segments or encoded separators; "
                    "send it as the endpoint's documentation spells it",
                },
            )
        if path == "/healthz":
            return json_response(connection, 200, {"status": "ok"})
        if path == "/readyz":
            checks = {}
            if self.redis is not None:
                checks["redis"] = "ok" if self.health.up else "unreachable: per-process limits"
            if self._listener is not None:
                checks["events"] = "ok" if self._listener.subscribed.is_set() else NOT_LISTENING
            degraded = any(state != "ok" for state in checks.values())
            status = "draining" if self.draining else "degraded" if degraded else "ready"
            return json_response(
                connection, 503 if self.draining else 200, {"status": status, "checks": checks}
            )
        if path == "/metrics":
            return respond(
                connection, 200, generate_latest(self.metrics.registry).decode(), CONTENT_TYPE_LATEST
            )
        route = self.routes.get(path)
        if route is not None:
            return await route(connection, request)
        if any(k.lower() == "generateredirectresponse" for k, _ in params) and not asks_for_upgrade(request):
            # The JavaScript SDK asks where a bare-host endpoint redirects to, and connects to
            # the URL it was given on any answer but 200: there is nowhere else to go.
            return respond(connection, 204, "", "text/plain")
        try:
            if path in VOICES_PATHS:
                voices = await self.gate.voices(request, params)
                response = respond(connection, 200, json.dumps(voices), "application/json")
                response.headers["Cache-Control"] = "private, max-age=600"
                return response
            pending = await self.gate.admit(request, path, params, self.draining)
        except Refusal as refusal:
            self.metrics.refused.labels(refusal.error).inc()
            log.info(  # the path only: the query may hold a token
                "handshake refused",
                extra={
                    "fields": {
                        "event": "refused",
                        "connection_id": str(connection.id),
                        "path": path,
                        "status": refusal.status,
                        "reason": refusal.error,
                        "message": refusal.message,
                    }
                },
            )
            headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after else {}
            if refusal.status == 426:
                headers["Upgrade"] = "websocket"  # what a 426 must name (RFC 9110 §15.5.22)
            return json_response(
                connection, refusal.status, {"error": refusal.error, "message": refusal.message}, headers
            )
        except HANDSHAKE_ERRORS as exc:
            log.error("cannot check a handshake: %s", type(exc).__name__)
            return json_response(
                connection, 503, {"error": "unavailable", "message": "retry shortly"}, {"Retry-After": "2"}
            )
        self._pending[connection.id] = pending
        if pending.endpoint.door == "azure" and self.settings.splice and connection.transport is not None:
            # Nothing more is read until the stream is spliced (speechgate/relay/splice.py): every byte
            # after the handshake then reaches the splice, none sits in websockets' buffers.
            connection.transport.pause_reading()
        return None

    def after_handshake(self, connection: ServerConnection, request: Request, response: Response) -> Response:
        """Every answer gets nosniff (browsers take the Content-Type as said), websockets' own
        refusals included; a stream admitted for a handshake that then failed (a bad key, a
        version websockets refuses) gives its slot back at once, and holds no memory."""
        response.headers["X-Content-Type-Options"] = "nosniff"
        if response.status_code != 101:
            pending = self._pending.pop(connection.id, None)
            if pending is not None:
                task = asyncio.ensure_future(self._release(pending.stream(), pending.placement))
                self._releasing.add(task)  # held until done, then let go
                task.add_done_callback(self._releasing.discard)
        return response

    # --- streams ----------------------------------------------------------------------------

    async def handler(self, connection: ServerConnection) -> None:
        pending = self._pending.pop(connection.id)
        stream = pending.stream()
        live = Live(
            connection,
            stream,
            pending.endpoint.door,
            pending.kid,
            placement=pending.placement,
            rules=pending.rules,
        )
        self.live[stream.stream_id] = live
        self.metrics.active.labels(live.door).inc()
        opened = live.opened
        try:
            remaining = stream.session_deadline - time.time()
            if remaining <= 0:
                doors.resume(connection)
                live.end(4000, 4000, "session time limit reached")
                return
            deadline = asyncio.get_running_loop().call_later(
                remaining, live.end, 4000, 4000, "session time limit reached"
            )
            try:
                if live.door == "azure":
                    await azure.serve(self, live, pending)
                else:
                    await plain.serve(self, live, pending)
            finally:
                deadline.cancel()
        finally:
            if live.closer is not None:  # our close code, not the 1000 of a returning handler
                with contextlib.suppress(Exception):
                    await live.closer
            del self.live[stream.stream_id]
            self.metrics.active.labels(live.door).dec()
            self._meter([stream])
            code = live.code or connection.close_code
            # An app picks any code from 3000 to 4999: only the ones that mean something here
            # become label values, or one client could create thousands of series.
            self.metrics.closed.labels(live.door, str(code) if code in KNOWN_CLOSE_CODES else "other").inc()
            log.info(
                "stream ended",
                extra={
                    "fields": {
                        "event": "stream",
                        "connection_id": str(connection.id),
                        "stream_id": stream.stream_id,
                        "client": stream.claims.client_id,
                        "door": live.door,
                        "path": pending.path,
                        "close_code": code,
                        "outcome": stream.closing_reason or "done",
                        "duration_s": round(time.monotonic() - opened, 3),
                        "audio_s": round(stream.total_audio_s, 3),
                    }
                },
            )
            await self._release(stream, live.placement)

    async def _release(self, stream: Stream, placement: Placement | None) -> None:
        """Free the stream's slots and count its last audio; what Redis could not take now (or
        what the per-process rules counted during an outage) is written by a later heartbeat."""
        assert stream.backend is not None  # every stream comes from Pending.stream()
        if placement is not None:
            await self.pool.release(placement)
        self.local_sessions.forget(stream)  # a lease it may hold here through an outage
        try:
            await stream.backend.release(stream)
        except REDIS_ERRORS as exc:
            self.health.mark_down(exc)
            self._unsettle(stream)
            return
        if stream.backend is self.local_sessions and self.redis_sessions is not None:
            stream.released = True
            self._unsettle(stream)

    def _unsettle(self, stream: Stream) -> None:
        if len(self.unsettled) >= MAX_UNSETTLED:  # a long outage: forget the oldest, not memory
            log.warning("dropping the audio count of a stream that ended during a Redis outage")
            self.unsettled.pop(0)
        self.unsettled.append(stream)

    # --- background work --------------------------------------------------------------------

    async def on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "revoke":
            if isinstance(event.get("kid"), str):
                self.auth.distrusted.add(event["kid"])
            for live in list(self.live.values()):
                if _covers(event, live):
                    live.end(4000, 1008, SIGNING_KEY_REVOKED if "kid" in event else "token revoked")
        elif event.get("type") == "reload":
            what = event.get("what")
            if what in (None, "signing-key"):
                self.auth.keys_changed()
            if what in (None, "speech-key"):
                self.credentials.invalidate()
                self.pool.credentials_changed()
            if what in (None, "upstreams"):
                await self.pool.load()
            if what in (None, "client"):
                self.clients.clear()

    def _meter(self, streams: list[Stream]) -> None:
        """Bring the audio-seconds metric up to date with what the streams have forwarded."""
        new: dict[str, float] = {}
        for stream in streams:
            client_id = stream.claims.client_id
            new[client_id] = new.get(client_id, 0.0) + stream.total_audio_s - stream.in_metrics_s
            stream.in_metrics_s = stream.total_audio_s
        for client_id, seconds in new.items():
            self.metrics.audio.labels(client_id).inc(seconds)

    async def _heartbeat_forever(self) -> None:
        loaded = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            await self.heartbeat()
            if time.monotonic() - loaded >= self.settings.client_cache_s:  # a reload event missed
                loaded = time.monotonic()
                await self.pool.load()

    async def heartbeat(self) -> None:
        """Renew leases, count audio, end the streams over a quota; with Redis back after an
        outage, move the streams admitted meanwhile to the shared rules and count what the
        failed writes missed."""
        streams = [live.stream for live in self.live.values() if live.stream.closing_reason is None]
        self._meter(streams)
        policies = {}
        for client_id in {s.claims.client_id for s in streams}:
            policy = await self.clients.get(client_id)
            if isinstance(policy, ClientPolicy):
                policies[client_id] = policy
        if self.redis_sessions is not None and self.health.up:
            for stream in streams:
                if stream.backend is self.local_sessions:
                    self.local_sessions.forget(stream)
                    stream.backend = self.redis_sessions  # its whole audio is counted below
        beats = [
            await self.local_sessions.heartbeat(
                [s for s in streams if s.backend is self.local_sessions], policies
            )
        ]
        shared = [s for s in streams if s.backend is self.redis_sessions]
        if self.redis_sessions is not None and (shared or self.unsettled) and self.health.up:
            try:
                if self.unsettled:
                    await self.redis_sessions.settle(self.unsettled)
                    self.unsettled = []
                beats.append(await self.redis_sessions.heartbeat(shared, policies))
            except REDIS_ERRORS as exc:  # the leases renew on the next beat, or run out
                self.health.mark_down(exc)
        for beat in beats:
            for client_id, share in beat.audio_use.items():
                self.metrics.quota_use.labels(client_id, "audio_day").set(share)
        await self.pool.renew(live.placement for live in self.live.values() if live.placement is not None)
        for stream, reason in [entry for beat in beats for entry in beat.over]:
            live = self.live.get(stream.stream_id)
            if live is not None:
                live.end(4000, 4429, reason)

    # --- running ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(
        self, host: str | None = None, port: int | None = None, sock: socket.socket | None = None
    ) -> AsyncIterator[Server]:
        """Serve on `host`:`port`, or on a socket bound already (`sock`)."""
        await self.pool.load()
        if self.libopus is not None:
            log.info("Opus is decoded with %s", self.libopus.version)
        else:
            log.warning("libopus not found: Opus is decoded with FFmpeg, at up to twice the CPU")
        if self._listener is not None:
            self._listener.start()
        self._tasks.append(asyncio.create_task(self._heartbeat_forever()))
        try:
            async with serve(
                self.handler,
                host,
                port,
                sock=sock,
                process_request=self.process_request,
                process_response=self.after_handshake,
                subprotocols=[Subprotocol("USP")],
                select_subprotocol=_usp_if_offered,
                compression=None,
                max_size=self.settings.max_frame_bytes,
                max_queue=16,
                ping_interval=self.settings.keepalive_s,
                ping_timeout=self.settings.keepalive_s,
                close_timeout=5,
                server_header=None,
                logger=_ws_log,
            ) as server:
                yield server
        finally:
            for task in self._tasks:
                task.cancel()
            if self._listener is not None:
                await self._listener.close()
            await self.health.close()
            await self.pool.aclose()
            await self.credentials.aclose()
            if self.redis_sessions is not None:
                await self.redis_sessions.aclose()
            await self.http.aclose()

    async def drain(self) -> None:
        """Stop taking streams; close each live one with 1001 after its turn, or at the timeout."""
        self.draining = True
        for live in list(self.live.values()):
            if live.in_turn:
                live.drain_after_turn = True
            else:
                live.end(1001, 1001, "relay draining; reconnect")
        deadline = time.monotonic() + self.settings.drain_s
        while self.live and time.monotonic() < deadline:
            await asyncio.wait(
                [asyncio.ensure_future(live.ended.wait()) for live in self.live.values()],
                timeout=max(0.0, deadline - time.monotonic()),
            )
        for live in list(self.live.values()):
            live.end(1001, 1001, "relay draining; reconnect")

    async def aclose(self) -> None:
        self.workers.shutdown(wait=False, cancel_futures=True)
        if self.redis is not None:
            await self.redis.aclose()
        await self.store.close()


def _usp_if_offered(connection: ServerConnection, offered: Any) -> Any:
    return "USP" if "USP" in offered else None


def _covers(event: dict[str, Any], live: Live) -> bool:
    claims = live.stream.claims
    if event.get("kid"):
        return bool(event["kid"] == live.kid)
    if event.get("jti"):
        return bool(event["jti"] == claims.jti)
    if event.get("client_id") != claims.client_id:
        return False
    if "sub" in event and event["sub"] != claims.sub:
        return False
    return claims.iat <= int(event.get("at", 0))
