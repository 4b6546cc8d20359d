"""`speechgate dev`, `speechgate token-service`, `speechgate relay`: the processes.

Each binds its sockets before printing anything (a busy port is one clear line and exit code 5),
then serves on uvloop; SIGTERM drains the relay (live streams end after their turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator

import click
import httpx
import uvicorn
import uvloop

from speechgate.cli.common import cannot_start, load_settings
from speechgate.core.filestore import FileStore
from speechgate.core.keys import load_keyring
from speechgate.core.revocation import MemoryRevocations
from speechgate.core.runtime import RELAY, TOKEN_SERVICE, open_redis, open_store
from speechgate.core.settings import (
    ENV_NAMES,
    LOOPBACK_HOSTS,
    Settings,
    SettingsError,
    url_host,
    with_addresses,
)
from speechgate.core.store import StoreError
from speechgate.devtools.dev import DevClient
from speechgate.relay.server import Relay
from speechgate.token_service.app import create_app, server_options


def _listen(host: str, port: int, option: str) -> socket.socket:
    """The listening socket, bound before anything is printed: a busy port is one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise cannot_start(
            f"cannot listen on {url_host(host)}:{port}: {reason}; choose another port with {option}"
        ) from None


def _bound(settings: Settings, token: tuple[str, int] | None, relay: tuple[str, int] | None) -> Settings:
    try:
        return with_addresses(settings, os.environ, token=token, relay=relay)
    except SettingsError as exc:
        raise cannot_start(str(exc)) from None


class _Server(uvicorn.Server):
    """uvicorn on a socket bound already; it says where it runs, as it does when it binds."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if sockets and not self.should_exit:
            host, port = sockets[0].getsockname()[:2]
            logging.getLogger("uvicorn.error").info(
                "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", url_host(host), port
            )


def _uvicorn(app: object, host: str, port: int, settings: Settings) -> uvicorn.Server:
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level=settings.log_level,
        log_config=None,  # ours (speechgate/core/logs.py): one format for every line
        access_log=False,  # query strings may carry tokens; we log requests ourselves
        timeout_graceful_shutdown=10,
        **server_options(settings),
    )
    return _Server(config)


@contextlib.contextmanager
def _ctrl_c_is_a_stop() -> Iterator[None]:
    """uvicorn stops on Ctrl-C, then raises it again (KeyboardInterrupt): click would print
    "Aborted!" and exit 1. An operator's Ctrl-C is a normal stop: exit 0."""
    try:
        yield
    except KeyboardInterrupt:
        logging.getLogger("speechgate").info("stopped (Ctrl-C)")


def _serve(app: object, sock: socket.socket, settings: Settings) -> None:
    host, port = sock.getsockname()[:2]
    with _ctrl_c_is_a_stop():
        uvloop.run(_uvicorn(app, host, port, settings).serve(sockets=[sock]))


async def _run_relay(relay: Relay, sock: socket.socket) -> None:
    """Serve until SIGTERM or SIGINT, then drain: live streams end after their turn."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    host, port = sock.getsockname()[:2]
    async with relay.running(sock=sock):
        # Everything loaded so far lives as long as the process: keep it out of the collector's
        # full passes, which otherwise pause every stream for tens of milliseconds.
        gc.freeze()
        logging.getLogger("speechgate.relay").info("relay listening on ws://%s:%d", host, port)
        await stop.wait()
        await relay.drain()
    await relay.aclose()


@click.command()
@click.option("--host", default=None, help="Address of both services [SPEECHGATE_HOST, 127.0.0.1]")
@click.option(
    "--port", type=int, default=None, help="Token service port [SPEECHGATE_PORT, 8000]; 0: any free"
)
@click.option(
    "--relay-port", type=int, default=None, help="Relay port [SPEECHGATE_RELAY_PORT, 8001]; 0: any free"
)
@click.option("--no-redis", is_flag=True, help="Keep limits and revocations in this process; start no Redis.")
def dev(host: str | None, port: int | None, relay_port: int | None, no_redis: bool) -> None:
    """Run speechgate on embedded defaults: a local file store, a dev client, an offline recognizer
    while no Azure Speech is configured, and a private Redis (when redis-server is installed and
    no REDIS_URL is set) that the `tokens`, `keys` and `quotas` commands find."""
    from speechgate.core.clients import PolicyError
    from speechgate.devtools.dev import (
        DevState,
        PrivateRedis,
        already_running,
        banner,
        bootstrap,
        clear_state,
        hold_store,
        save_state,
    )

    settings = load_settings()
    if hold_store(settings.store_dir) is None:  # held until this process ends
        raise cannot_start(already_running(settings.store_dir))
    host = host or settings.host
    relay_host = host if host != settings.host else settings.relay_host
    token_sock = _listen(host, settings.port if port is None else port, "--port or SPEECHGATE_PORT")
    relay_sock = _listen(
        relay_host,
        settings.relay_port if relay_port is None else relay_port,
        "--relay-port or SPEECHGATE_RELAY_PORT",
    )
    # What tokens, metadata and the banner advertise: the addresses bound, unless set explicitly.
    settings = _bound(settings, token_sock.getsockname()[:2], relay_sock.getsockname()[:2])
    store = FileStore(settings.store_dir)
    try:
        client = asyncio.run(bootstrap(store, settings.store_dir))
    except PolicyError as exc:
        raise cannot_start(
            f"SPEECHGATE_DEV_CLIENT_ID: {exc} (e.g. SPEECHGATE_DEV_CLIENT_ID=my-app)"
        ) from None
    token_url = settings.issuer
    offline = not (settings.speech_endpoint or settings.speech_region)
    private_redis = PrivateRedis(settings.store_dir)
    if settings.redis_url is None and not no_redis:  # the security and SRE commands need one
        settings = dataclasses.replace(settings, redis_url=private_redis.start())
    state = DevState(
        token_url, settings.relay_url, settings.redis_url if private_redis.url else None, os.getpid()
    )
    save_state(settings.store_dir, state)
    # uvicorn stops on SIGTERM, then raises it again: exit through Python, so that the cleanup
    # below runs (the private Redis stopped, the state file gone) instead of dying at once.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        click.echo(banner(client, token_url, settings.relay_url, settings, private=bool(private_redis.url)))
        with _ctrl_c_is_a_stop():
            _dev_serve(settings, store, client, token_sock, relay_sock, offline)
    finally:
        clear_state(settings.store_dir)
        private_redis.stop()


def _dev_serve(
    settings: Settings,
    store: FileStore,
    client: DevClient,
    token_sock: socket.socket,
    relay_sock: socket.socket,
    offline: bool,
) -> None:
    from speechgate.devtools.demo import demo_routes
    from speechgate.devtools.offline import OfflineSpeech

    token_url = settings.issuer
    redis = open_redis(settings, TOKEN_SERVICE)
    # Without Redis the two services share revocations in this process.
    shared = None if redis else MemoryRevocations()
    app = create_app(settings, store, redis, revocations=shared)
    # The relay checks tokens against this token service, wherever --host/--port put it.
    relay_settings = dataclasses.replace(
        settings, jwks_url=settings.jwks_url or f"{token_url}/.well-known/jwks.json"
    )

    async def both() -> None:
        async with contextlib.AsyncExitStack() as stack:
            config = relay_settings
            if offline:  # the relay reaches it as it would Azure: same doors, same code
                endpoint = await stack.enter_async_context(OfflineSpeech().running())
                config = dataclasses.replace(config, speech_endpoint=endpoint, speech_key="offline")
            http = httpx.AsyncClient()
            stack.push_async_callback(http.aclose)
            # Each service gets its own Redis client: each closes what it owns at shutdown.
            relay = Relay(
                config,
                store,
                open_redis(settings, RELAY),
                revocations=shared,
                routes=demo_routes(client, token_url, http),
                upstream_name="Offline mode" if offline else "Azure Speech",
            )
            if shared is not None:
                shared.subscribe(relay.on_event)
            # uvicorn handles Ctrl-C for the token service; the relay stops with it.
            async with relay.running(sock=relay_sock):
                bound = token_sock.getsockname()
                await _uvicorn(app, bound[0], bound[1], settings).serve(sockets=[token_sock])
            await relay.aclose()

    uvloop.run(both())


@click.command("token-service")
@click.option("--host", default=None, help="Listen address [SPEECHGATE_HOST, 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Listen port [SPEECHGATE_PORT, 8000]")
def token_service(host: str | None, port: int | None) -> None:
    """Run the token service (production)."""
    settings = load_settings()
    host = host or settings.host
    sock = _listen(host, settings.port if port is None else port, "--port or SPEECHGATE_PORT")
    bound_host, bound_port = sock.getsockname()[:2]
    # Where the relay is cannot be seen from here: on loopback it is the same host's relay port.
    settings = _bound(settings, (bound_host, bound_port), (bound_host, settings.relay_port))
    try:
        store = open_store(settings)
        asyncio.run(load_keyring(store))  # fail here with one clear line, not in the server
        app = create_app(settings, store, open_redis(settings, TOKEN_SERVICE))
    except SettingsError as exc:
        raise cannot_start(str(exc)) from None
    except StoreError as exc:
        raise cannot_start(f"cannot start: {exc}") from None
    _serve(app, sock, settings)


@click.command("relay")
@click.option("--host", default=None, help="Listen address [SPEECHGATE_RELAY_HOST, 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Listen port [SPEECHGATE_RELAY_PORT, 8001]")
def relay_command(host: str | None, port: int | None) -> None:
    """Run the relay (production); SIGTERM drains it."""
    settings = load_settings()
    host = host or settings.relay_host
    if host not in LOOPBACK_HOSTS and not os.environ.get(ENV_NAMES["issuer"]):
        raise cannot_start(
            "SPEECHGATE_ISSUER is not set: set it to the token service's URL, which the relay checks "
            "tokens against (e.g. https://speech-auth.example.com)"
        )
    sock = _listen(host, settings.relay_port if port is None else port, "--port or SPEECHGATE_RELAY_PORT")
    try:
        relay = Relay(settings, open_store(settings), open_redis(settings, RELAY))
    except SettingsError as exc:
        raise cannot_start(str(exc)) from None
    uvloop.run(_run_relay(relay, sock))
