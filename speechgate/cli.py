"""The `speechgate` command line."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys

import click
import uvicorn
import uvloop

from relay.server import Relay
from speechgate import admin
from token_service.app import create_app
from token_service.filestore import FileStore
from token_service.keys import load_keyring
from token_service.revocation import MemoryRevocations
from token_service.runtime import open_redis, open_store
from token_service.settings import Settings, SettingsError
from token_service.store import StoreError


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None


def _uvicorn(app: object, host: str, port: int, settings: Settings) -> uvicorn.Server:
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level=settings.log_level,
        access_log=False,  # query strings may carry tokens; we log requests ourselves
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=10,
    )
    return uvicorn.Server(config)


def _serve(app: object, host: str, port: int, settings: Settings) -> None:
    _uvicorn(app, host, port, settings).run()


async def _run_relay(relay: Relay, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then drain: live streams end after their turn."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with relay.running(host, port):
        logging.getLogger("speechgate.relay").info("relay listening on ws://%s:%d", host, port)
        await stop.wait()
        await relay.drain()
    await relay.aclose()


@click.group()
def main() -> None:
    """speechgate: Azure Speech for apps that hold no Azure key."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--host", default=None, help="Token service address [SPEECHGATE_HOST, 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Token service port [SPEECHGATE_PORT, 8000]")
def dev(host: str | None, port: int | None) -> None:
    """Run speechgate on embedded defaults: a local file store, a dev client, in-memory limits."""
    from speechgate.dev import banner, bootstrap

    settings = _settings()
    host = host or settings.host
    port = settings.port if port is None else port
    store = FileStore(settings.store_dir)
    client = asyncio.run(bootstrap(store, settings.store_dir))
    relay_url = f"ws://{settings.relay_host}:{settings.relay_port}"
    click.echo(banner(client, f"http://{host}:{port}", relay_url, settings))
    redis = open_redis(settings)
    # Without Redis the two services share revocations in this process.
    shared = None if redis else MemoryRevocations()
    app = create_app(settings, store, redis, revocations=shared)
    # The relay checks tokens against this token service, wherever --host/--port put it.
    relay_settings = dataclasses.replace(
        settings, jwks_url=settings.jwks_url or f"http://{host}:{port}/.well-known/jwks.json"
    )
    # Each service gets its own Redis client: each closes what it owns at shutdown.
    relay = Relay(relay_settings, store, open_redis(settings), revocations=shared)
    if shared is not None:
        shared.subscribe(relay.on_event)

    async def both() -> None:
        # uvicorn handles Ctrl-C for the token service; the relay stops with it.
        async with relay.running(settings.relay_host, settings.relay_port):
            await _uvicorn(app, host, port, settings).serve()
        await relay.aclose()

    uvloop.run(both())


@main.command("token-service")
@click.option("--host", default=None, help="Listen address [SPEECHGATE_HOST, 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Listen port [SPEECHGATE_PORT, 8000]")
def token_service(host: str | None, port: int | None) -> None:
    """Run the token service (production)."""
    settings = _settings()
    try:
        store = open_store(settings)
        asyncio.run(load_keyring(store))  # fail here with one clear line, not in the server
        app = create_app(settings, store, open_redis(settings))
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    except StoreError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None
    _serve(app, host or settings.host, settings.port if port is None else port, settings)


main.add_command(admin.keys)
main.add_command(admin.clients)
main.add_command(admin.tokens)


@main.command("relay")
@click.option("--host", default=None, help="Listen address [SPEECHGATE_RELAY_HOST, 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Listen port [SPEECHGATE_RELAY_PORT, 8001]")
def relay_command(host: str | None, port: int | None) -> None:
    """Run the relay (production); SIGTERM drains it."""
    settings = _settings()
    try:
        relay = Relay(settings, open_store(settings), open_redis(settings))
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    uvloop.run(_run_relay(relay, host or settings.relay_host, settings.relay_port if port is None else port))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
