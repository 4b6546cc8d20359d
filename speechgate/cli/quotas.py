"""`speechgate quotas top|show|set|reset`: the SREs' view of who uses how much, and the knobs.

`top` and `show` read the live Redis state; `set` changes a client's policy in the key store and
tells every replica to reload it (pub/sub), so it holds everywhere within a second; `reset` forgets
a client's (or a subject's) daily audio and rate-limit windows. Same conventions as the security
team's commands (speechgate/cli/common.py): `--json`, `--yes`, audit lines, exit codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import time
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from speechgate.cli.common import (
    Failed,
    announce,
    audit,
    confirm,
    escaped,
    json_option,
    names,
    output,
    run,
    yes_option,
)
from speechgate.cli.upstreams import pool_rows
from speechgate.core import clients as clientdb
from speechgate.core.clients import ClientPolicy, PolicyError
from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import Redis
from speechgate.core.settings import Settings
from speechgate.core.store import SecretStore
from speechgate.token_service import usage


def _need_redis(redis: Redis | None) -> Redis:
    if redis is None:
        raise Failed("quotas live in Redis: set REDIS_URL (or SPEECHGATE_REDIS_URL)")
    return redis


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


POLICIES_REFRESH_S = 30.0


@click.group()
def quotas() -> None:
    """Live use against each client's limits, and changing them without a deploy."""


# --- top -------------------------------------------------------------------------------------


def shown(text: str) -> Text:
    """A name for a table cell: escaped, and never read as rich markup."""
    return Text(escaped(text))


def _table(rows: list[usage.Usage], by: str) -> Table:
    table = Table(title=f"speechgate quotas by {by} — {time.strftime('%H:%M:%S')}", title_justify="left")
    table.add_column("client")
    if by == "subject":
        table.add_column("subject")
    for name in ("streams", "audio today", "use", "tokens/1m", "refused/1m"):
        table.add_column(name, justify="right")
    for row in rows:
        audio = f"{_duration(row.audio_s)} / {_duration(row.audio_limit_s)}"
        use = f"{row.ratio:.0%}"
        style = "bold red" if row.ratio >= 0.9 else "yellow" if row.ratio >= 0.7 else None
        cells: list[str | Text] = [shown(row.client_id)]
        if by == "subject":
            cells.append(shown(row.subject or ""))
        cells += [f"{row.streams} / {row.streams_limit}", audio, use, str(row.issued_1m), str(row.refused_1m)]
        table.add_row(*cells, style=style)
    return table


def _upstream_table(rows: list[dict[str, Any]]) -> Table:
    title = f"speechgate upstream pool — {time.strftime('%H:%M:%S')}"
    table = Table(title=title, title_justify="left")
    for name in ("upstream", "state", "zone", "health"):
        table.add_column(name)
    for name in ("streams", "use"):
        table.add_column(name, justify="right")
    for row in rows:
        use = (row["live"] or 0) / row["limit"]
        style = "bold red" if use >= 0.9 or row["healthy"] is False else "yellow" if use >= 0.7 else None
        health = {True: "up", False: f"down ({row['down_for_s']:.0f} s)", None: "?"}[row["healthy"]]
        cells: list[str | Text] = [shown(row["name"]), row["state"], shown(row["zone"] or "-"), health]
        table.add_row(*cells, f"{row['live']} / {row['limit']}", f"{use:.0%}", style=style)
    if not rows:
        table.caption = "no pool: the relays use their configured upstream"
    return table


async def _top_rows(
    policies: list[ClientPolicy], redis: Redis, settings: Settings, by: str
) -> list[usage.Usage]:
    keys, now = Keyspace(settings.redis_prefix), time.time()
    read = usage.client_usage if by == "client" else usage.subject_usage
    rows = await read(redis, keys, policies, now)
    return sorted(rows, key=lambda u: (-u.ratio, -u.streams, -u.issued_1m, u.client_id, u.subject or ""))


@quotas.command("top")
@click.option(
    "--by",
    type=click.Choice(["client", "subject", "upstream"]),
    default="client",
    show_default=True,
    help="upstream: each Azure Speech resource of the pool, its live streams against its limit.",
)
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--limit", type=int, default=50, show_default=True, help="Rows to show.")
@json_option
def top(by: str, watch: bool, interval: float, limit: int, as_json: bool) -> None:
    """Who uses the most: live streams, audio today against the limit, tokens in the last minute."""

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> None:
        live_redis = _need_redis(redis)
        console = Console()

        # The policies change rarely and the store may be Key Vault: re-read them now and then,
        # not at every refresh.
        policies, read_at = await clientdb.all_clients(store), time.monotonic()

        async def frame() -> tuple[list[dict[str, Any]], Table]:
            """The rows (as --json prints them) and the table."""
            nonlocal policies, read_at
            if by == "upstream":
                pool = await pool_rows(store, live_redis, settings)
                return pool, _upstream_table(pool)
            if time.monotonic() - read_at > POLICIES_REFRESH_S:
                policies, read_at = await clientdb.all_clients(store), time.monotonic()
            rows = (await _top_rows(policies, live_redis, settings, by))[:limit]
            return [row.as_dict() for row in rows], _table(rows, by)

        if not watch:
            rows, table = await frame()
            if as_json:
                click.echo(json.dumps(rows, indent=1))
            else:
                console.print(table)
            return
        # Ctrl-C (or SIGTERM) ends --watch between two refreshes: the loop stops on an event
        # rather than through the cancellation of whatever Redis call it is in.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        async def pause() -> bool:
            """Wait one interval; False once told to stop."""
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            return not stop.is_set()

        if as_json:  # one JSON line per refresh, for scripts
            while not stop.is_set():
                click.echo(json.dumps((await frame())[0]))
                await pause()
            return
        with Live((await frame())[1], console=console, auto_refresh=False) as display:
            while await pause():
                display.update((await frame())[1], refresh=True)

    with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C before the loop runs
        run(op, changes=False)


# --- show ------------------------------------------------------------------------------------


@quotas.command("show")
@click.argument("client_id")
@click.option("--subject", default=None, help="One of the client's users.")
@json_option
def show(client_id: str, subject: str | None, as_json: bool) -> None:
    """Every counter and lease of a client (or subject) with its limit and reset time."""

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> usage.Detail:
        policy = await clientdb.load_client(store, client_id)
        return await usage.detail(_need_redis(redis), Keyspace(settings.redis_prefix), policy, subject)

    found = run(op, changes=False)
    u = found.usage
    share = u.audio_s / max(u.audio_limit_s, 1)
    who = client_id + (f" / subject {escaped(subject)}" if subject else "")
    lines = [
        who,
        f"  streams      {u.streams} of {u.streams_limit}"
        + "".join(f"\n    {lease['stream_id']}  lease {lease['lease_left_s']} s" for lease in found.leases),
        f"  audio today  {u.audio_s:.1f} s of {u.audio_limit_s} s ({share:.0%}),"
        f" resets in {_duration(found.audio_reset_s)} (00:00 UTC)",
        f"  tokens       {u.issued_1m} issued, {u.refused_1m} refused by the limits in the last minute",
    ]
    for w in found.windows:
        lines.append(f"  rate         {w.limit}: {w.used} of {w.amount}, window moves in {w.reset_s} s")
    if found.revoked_at:
        lines.append(f"  revoked      every token issued before {time.ctime(found.revoked_at)}")
    output(as_json, found.as_dict(), "\n".join(lines))


# --- set -------------------------------------------------------------------------------------


SETTABLE = {
    # option name: (policy field, factor from the option's unit to the policy's)
    "streams": ("max_streams_per_client", 1),
    "subject_streams": ("max_streams_per_subject", 1),
    "audio_minutes_per_day": ("audio_s_per_day_client", 60),
    "subject_audio_minutes_per_day": ("audio_s_per_day_subject", 60),
    "max_session_minutes": ("max_session_s", 60),
}


@quotas.command("set")
@click.argument("client_id")
@click.option("--streams", type=click.IntRange(1), help="Live streams for the whole client.")
@click.option("--subject-streams", type=click.IntRange(1), help="Live streams per user.")
@click.option("--audio-minutes-per-day", type=click.IntRange(1), help="Audio per UTC day, whole client.")
@click.option("--subject-audio-minutes-per-day", type=click.IntRange(1), help="Audio per UTC day per user.")
@click.option("--max-session-minutes", type=click.IntRange(1), help="Longest session of one token.")
@click.option("--tokens-per-minute", type=click.IntRange(1), help="Token requests per minute, whole client.")
@click.option("--rate-client", help='Client rate limits in full, e.g. "600/minute;20000/hour".')
@click.option("--rate-subject", help='Per-user rate limits, e.g. "20/minute;300/hour".')
@click.option("--rate-ip", help='Per-address rate limits, e.g. "120/minute".')
@click.option("--custom-models", help='Custom Speech models (cid) allowed, comma-separated ("" none, * any).')
@click.option("--custom-voices", help='Custom voices (deploymentId) allowed, comma-separated ("" none).')
@click.option("--store-audio/--no-store-audio", default=None, help="Whether Azure may store its audio.")
@click.option("--origins", help='Web origins whose pages may stream, comma-separated ("": any).')
@click.option("--zones", help='Upstream pool zones its streams may use, comma-separated ("": any).')
@json_option
def set_limits(client_id: str, as_json: bool, **options: Any) -> None:
    """Change a client's limits live: every replica applies them within a second."""
    changes: dict[str, Any] = {}
    for option, (name, factor) in SETTABLE.items():
        if options[option] is not None:
            changes[name] = options[option] * factor
    for name in ("custom_models", "custom_voices", "origins", "zones"):
        if options[name] is not None:
            changes[name] = tuple(names(options[name]))
    if options["store_audio"] is not None:
        changes["store_audio"] = options["store_audio"]
    rates = {k: options[f"rate_{k}"] for k in ("client", "subject", "ip") if options[f"rate_{k}"] is not None}
    if options["tokens_per_minute"] is not None:
        if "client" in rates:
            raise click.UsageError("--tokens-per-minute and --rate-client both set the client's rate limits")
        rates["client"] = f"{options['tokens_per_minute']}/minute"
    if not changes and not rates:
        raise click.UsageError("nothing to change: give at least one limit (see --help)")

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> dict[str, Any]:
        policy = await clientdb.load_client(store, client_id)
        try:  # a limit given wrong is bad usage (2), as in `clients add`, and changes nothing
            updated = dataclasses.replace(
                policy, **changes, rate_limits=dataclasses.replace(policy.rate_limits, **rates)
            )
            updated.validate()
        except PolicyError as exc:
            raise click.UsageError(str(exc)) from None
        await clientdb.save_client(store, updated)
        announced = await announce(redis, settings, "client")
        return {"client_id": client_id, "limits": _limits(updated), "announced": announced}

    result = run(op)
    audit(
        "quotas.set", client_id=client_id, changes={**changes, **{f"rate_{k}": v for k, v in rates.items()}}
    )
    output(as_json, result, "\n".join(f"{k}: {v}" for k, v in result["limits"].items()))


def _limits(policy: ClientPolicy) -> dict[str, Any]:
    return {
        "max_streams_per_client": policy.max_streams_per_client,
        "max_streams_per_subject": policy.max_streams_per_subject,
        "audio_s_per_day_client": policy.audio_s_per_day_client,
        "audio_s_per_day_subject": policy.audio_s_per_day_subject,
        "max_session_s": policy.max_session_s,
        "rate_client": policy.rate_limits.client,
        "rate_subject": policy.rate_limits.subject,
        "rate_ip": policy.rate_limits.ip,
        "custom_models": list(policy.custom_models),
        "custom_voices": list(policy.custom_voices),
        "store_audio": policy.store_audio,
        "origins": list(policy.origins),
    }


# --- reset -----------------------------------------------------------------------------------


@quotas.command("reset")
@click.argument("client_id")
@click.option("--subject", default=None, help="Only this user.")
@yes_option
@json_option
def reset(client_id: str, subject: str | None, yes: bool, as_json: bool) -> None:
    """Forget today's audio and the rate-limit windows (live streams keep their slots)."""
    who = f"subject {subject!r} of client {client_id!r}" if subject else f"client {client_id!r}"
    confirm(yes, f"Reset today's audio and the rate limits of {who}?")

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> int:
        policy = await clientdb.load_client(store, client_id)
        return await usage.reset(
            _need_redis(redis), Keyspace(settings.redis_prefix), policy, subject, time.time()
        )

    deleted = run(op)
    audit("quotas.reset", client_id=client_id, subject=subject, keys_deleted=deleted)
    output(as_json, {"client_id": client_id, "subject": subject, "keys_deleted": deleted}, f"reset {who}")
