"""`speechgate stream FILE.wav`: transcribe a file through the relay, as an app would."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from speechgate.cli.common import load_settings


@click.command("stream")
@click.argument("wav", metavar="FILE")
@click.option("--token-url", default=None, help="Token service [http://SPEECHGATE_HOST:SPEECHGATE_PORT]")
@click.option("--relay-url", default=None, help="Relay [ws://SPEECHGATE_RELAY_HOST:SPEECHGATE_RELAY_PORT]")
@click.option("--client-id", default=None, help="Client credentials [the dev client's]")
@click.option("--client-secret", default=None, envvar="SPEECHGATE_CLIENT_SECRET", help="[the dev client's]")
@click.option("--language", default="en-US", show_default=True)
@click.option("--fast", is_flag=True, help="Send faster than real time (as fast as the relay allows).")
@click.option("--sdk", is_flag=True, help="Go through the official Speech SDK (the Azure-compatible door).")
@click.option(
    "--opus", is_flag=True, help="Encode the WAV to Ogg/Opus (24 kbit/s) and send that, as a phone would."
)
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
    opus: bool,
    as_json: bool,
) -> None:
    """Transcribe an audio file through the relay, as an app would: token, stream, results.

    FILE is a WAV (any PCM; sent as 16 kHz PCM, or as Ogg/Opus with --opus), or an .opus, .ogg or
    .webm file of Opus audio, sent as it is to the plain door."""
    from pathlib import Path

    from speechgate.devtools import compress, stream
    from speechgate.devtools.dev import running_state, saved_client
    from speechgate.devtools.wav import WavError, read_pcm16k

    settings = load_settings()
    path = Path(wav)
    compressed = path.suffix.lower() in compress.SUFFIXES
    if (opus or compressed) and sdk:
        raise click.UsageError(
            "Opus goes to the plain door; --sdk sends PCM through the Speech SDK: drop one"
        )
    try:
        if compressed:
            audio = stream.Audio(*compress.read_opus(path))
        else:
            pcm = read_pcm16k(path)
            audio = (
                stream.Audio(compress.encode_opus(pcm), "ogg-opus", len(pcm) / stream.BYTES_PER_S)
                if opus
                else stream.Audio.pcm(pcm)
            )
    except (WavError, ValueError) as exc:
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
            result = stream.stream_sdk(
                relay_url, token, audio.payload, fast=fast, language=language, listener=show
            )
        else:
            result = asyncio.run(
                stream.stream_plain(relay_url, token, audio, fast=fast, language=language, listener=show)
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
    if audio.format != "pcm":
        sent, pcm_bytes = summary["bytes_sent"], summary["pcm_bytes"]
        click.echo(
            f"sent {sent:,} bytes of {audio.format} where 16 kHz PCM needs {pcm_bytes:,} "
            f"({pcm_bytes / max(sent, 1):.1f} times more)",
            err=True,
        )
