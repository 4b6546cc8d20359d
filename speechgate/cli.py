"""The `speechgate` command line."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import signal
import sys

import click
import httpx
import uvicorn
import uvloop

from relay.server import Relay
from speechgate import admin
from speechgate.quotas import quotas
from token_service import logs
from token_service.app import create_app, server_options
from token_service.filestore import FileStore
from token_service.keys import load_keyring
from token_service.revocation import MemoryRevocations
from token_service.runtime import open_redis, open_store
from token_service.settings import Settings, SettingsError
from token_service.store import StoreError


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    logs.configure(settings.log_level, settings.log_format)
    return settings


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
        # Everything loaded so far lives as long as the process: keep it out of the collector's
        # full passes, which otherwise pause every stream for tens of milliseconds.
        gc.freeze()
        logging.getLogger("speechgate.relay").info("relay listening on ws://%s:%d", host, port)
        await stop.wait()
        await relay.drain()
    await relay.aclose()


@click.group()
def main() -> None:
    """speechgate: Azure Speech for apps that hold no Azure key."""
    logs.configure("info", "text")  # until a command reads its settings


@main.command()
@click.option("--host", default=None, help="Token service address [SPEECHGATE_HOST, 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Token service port [SPEECHGATE_PORT, 8000]")
def dev(host: str | None, port: int | None) -> None:
    """Run speechgate on embedded defaults: a local file store, a dev client, in-memory limits,
    and an offline recognizer while no Azure Speech is configured."""
    from relay.offline import OfflineSpeech
    from speechgate.demo import demo_routes
    from speechgate.dev import banner, bootstrap

    settings = _settings()
    host = host or settings.host
    port = settings.port if port is None else port
    store = FileStore(settings.store_dir)
    client = asyncio.run(bootstrap(store, settings.store_dir))
    token_url = f"http://{host}:{port}"
    offline = not (settings.speech_endpoint or settings.speech_region)
    click.echo(banner(client, token_url, f"ws://{settings.relay_host}:{settings.relay_port}", settings))
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
            )
            if shared is not None:
                shared.subscribe(relay.on_event)
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
main.add_command(quotas)


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
    from speechgate.dev import saved_client
    from speechgate.wav import WavError, read_pcm16k

    settings = _settings()
    try:
        pcm = read_pcm16k(Path(wav))
    except WavError as exc:
        raise click.UsageError(str(exc)) from None
    token_url = token_url or f"http://{settings.host}:{settings.port}"
    relay_url = relay_url or f"ws://{settings.relay_host}:{settings.relay_port}"
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
