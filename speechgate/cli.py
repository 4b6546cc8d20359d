"""The `speechgate` command line."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import signal
import socket
import sys

import click
import httpx
import uvicorn
import uvloop

from relay.server import Relay
from speechgate import admin
from speechgate.dev import DevClient
from speechgate.quotas import quotas
from token_service import logs
from token_service.app import create_app, server_options
from token_service.filestore import FileStore
from token_service.keys import load_keyring
from token_service.revocation import MemoryRevocations
from token_service.runtime import open_redis, open_store
from token_service.settings import (
    ENV_NAMES,
    LOOPBACK_HOSTS,
    Settings,
    SettingsError,
    url_host,
    with_addresses,
)
from token_service.store import StoreError


def cannot_start(message: str) -> admin.Failed:
    return admin.Failed(message, admin.EXIT_CANNOT_START)


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise cannot_start(str(exc)) from None
    logs.configure(settings.log_level, settings.log_format)
    return settings


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
        log_config=None,  # ours (token_service/logs.py): one format for every line
        access_log=False,  # query strings may carry tokens; we log requests ourselves
        timeout_graceful_shutdown=10,
        **server_options(settings),
    )
    return _Server(config)


def _serve(app: object, sock: socket.socket, settings: Settings) -> None:
    host, port = sock.getsockname()[:2]
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


@click.group(epilog=admin.EXIT_CODES)
def main() -> None:
    """speechgate: Azure Speech for apps that hold no Azure key."""
    logs.configure("info", "text")  # until a command reads its settings


@main.command()
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
    from speechgate.dev import DevState, PrivateRedis, banner, bootstrap, clear_state, save_state
    from token_service.clients import PolicyError

    settings = _settings()
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
    from speechgate.demo import demo_routes
    from speechgate.offline import OfflineSpeech

    token_url = settings.issuer
    redis = open_redis(settings)
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
                open_redis(settings),
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


@main.command("token-service")
@click.option("--host", default=None, help="Listen address [SPEECHGATE_HOST, 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Listen port [SPEECHGATE_PORT, 8000]")
def token_service(host: str | None, port: int | None) -> None:
    """Run the token service (production)."""
    settings = _settings()
    host = host or settings.host
    sock = _listen(host, settings.port if port is None else port, "--port or SPEECHGATE_PORT")
    bound_host, bound_port = sock.getsockname()[:2]
    # Where the relay is cannot be seen from here: on loopback it is the same host's relay port.
    settings = _bound(settings, (bound_host, bound_port), (bound_host, settings.relay_port))
    try:
        store = open_store(settings)
        asyncio.run(load_keyring(store))  # fail here with one clear line, not in the server
        app = create_app(settings, store, open_redis(settings))
    except SettingsError as exc:
        raise cannot_start(str(exc)) from None
    except StoreError as exc:
        raise cannot_start(f"cannot start: {exc}") from None
    _serve(app, sock, settings)


main.add_command(admin.keys)
main.add_command(admin.clients)
main.add_command(admin.tokens)
main.add_command(quotas)


@main.command("relay")
@click.option("--host", default=None, help="Listen address [SPEECHGATE_RELAY_HOST, 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Listen port [SPEECHGATE_RELAY_PORT, 8001]")
def relay_command(host: str | None, port: int | None) -> None:
    """Run the relay (production); SIGTERM drains it."""
    settings = _settings()
    host = host or settings.relay_host
    if host not in LOOPBACK_HOSTS and not os.environ.get(ENV_NAMES["issuer"]):
        raise cannot_start(
            "SPEECHGATE_ISSUER is not set: set it to the token service's URL, which the relay checks "
            "tokens against (e.g. https://speech-auth.example.com)"
        )
    sock = _listen(host, settings.relay_port if port is None else port, "--port or SPEECHGATE_RELAY_PORT")
    try:
        relay = Relay(settings, open_store(settings), open_redis(settings))
    except SettingsError as exc:
        raise cannot_start(str(exc)) from None
    uvloop.run(_run_relay(relay, sock))


@main.command("stream")
@click.argument("wav", metavar="FILE.wav")
@click.option("--token-url", default=None, help="Token service [http://SPEECHGATE_HOST:SPEECHGATE_PORT]")
@click.option("--relay-url", default=None, help="Relay [ws://SPEECHGATE_RELAY_HOST:SPEECHGATE_RELAY_PORT]")
@click.option("--client-id", default=None, help="Client credentials [the dev client's]")
@click.option("--client-secret", default=None, envvar="SPEECHGATE_CLIENT_SECRET", help="[the dev client's]")
@click.option("--language", default="en-US", show_default=True)
@click.option("--fast", is_flag=True, help="Send faster than real time (as fast as the relay allows).")
@click.option("--sdk", is_flag=True, help="Go through the official Speech SDK (the Azure-compatible door).")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per event, then a summary line.")
def stream_command(
    wav: str,
    token_url: str | None,
    relay_url: str | None,
    client_id: str | None,
    client_secret: str | None,
    language: str,
    fast: bool,
    sdk: bool,
    as_json: bool,
) -> None:
    """Transcribe a WAV file through the relay, as an app would: token, stream, results."""
    from pathlib import Path

    from speechgate import stream
    from speechgate.dev import running_state, saved_client
    from speechgate.wav import WavError, read_pcm16k

    settings = _settings()
    try:
        pcm = read_pcm16k(Path(wav))
    except WavError as exc:
        raise click.UsageError(str(exc)) from None
    running = running_state(settings.store_dir)  # a `speechgate dev` here: the URLs it bound
    token_url = token_url or (running.token_url if running else settings.issuer)
    relay_url = relay_url or (running.relay_url if running else settings.relay_url)
    if client_id is None or client_secret is None:
        saved = saved_client(settings.store_dir)
        if saved is None:
            raise click.UsageError(
                f"no dev client in {settings.store_dir}: start `speechgate dev` here first, "
                "or pass --client-id and --client-secret"
            )
        client_id, client_secret = client_id or saved.client_id, client_secret or saved.client_secret
    tty = sys.stdout.isatty() and not as_json

    def show(event: dict[str, object]) -> None:
        if as_json:
            click.echo(json.dumps(event))
        elif event["type"] == "partial":
            if tty:  # one line, rewritten in place
                click.echo(f"\r\033[K{event['text']}"[:200], nl=False)
        else:
            click.echo(("\r\033[K" if tty else "") + str(event["text"]))

    try:
        token = stream.get_token(token_url, client_id, client_secret)
        if sdk:
            result = stream.stream_sdk(relay_url, token, pcm, fast=fast, language=language, listener=show)
        else:
            result = asyncio.run(
                stream.stream_plain(relay_url, token, pcm, fast=fast, language=language, listener=show)
            )
    except stream.StreamError as exc:
        if tty:
            click.echo("\r\033[K", nl=False)
        raise click.ClickException(str(exc)) from None
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary))
        return

    def seconds(value: object) -> str:
        return "-" if value is None else f"{value:.2f} s"

    click.echo(
        f"{summary['audio_s']:.1f} s of audio, {summary['finals']} final result(s); first partial after "
        f"{seconds(summary['first_partial_s'])}; finals at most {seconds(summary['final_latency_s'])} "
        "after their audio was sent",
        err=True,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
