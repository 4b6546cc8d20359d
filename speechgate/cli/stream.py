"""`speechgate stream FILE.wav`: transcribe a file through the relay, as an app would."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from speechgate.cli.common import load_settings


@click.command("stream")
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

    from speechgate.devtools import stream
    from speechgate.devtools.dev import running_state, saved_client
    from speechgate.devtools.wav import WavError, read_pcm16k

    settings = load_settings()
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
