"""The `speechgate` command line."""

from __future__ import annotations

import asyncio
import logging
import sys

import click
import uvicorn

from speechgate import admin
from token_service.app import create_app
from token_service.filestore import FileStore
from token_service.keys import load_keyring
from token_service.runtime import open_redis, open_store
from token_service.settings import Settings, SettingsError
from token_service.store import StoreError


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None


def _serve(app: object, host: str, port: int, settings: Settings) -> None:
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
    uvicorn.Server(config).run()


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
    click.echo(banner(client, f"http://{host}:{port}", settings.redis_url))
    _serve(create_app(settings, store, open_redis(settings)), host, port, settings)


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

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
