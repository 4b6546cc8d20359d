"""`speechgate upstreams add|list|show|enable|disable|drain|remove`: the Azure Speech resources
behind the relays (speechgate/core/upstreams.py; the routing: speechgate/relay/pool.py).

Every change is stored, audited and announced (the reload event): every relay applies it within a
second, as `quotas set`. `list` and `show` read each upstream's live streams and health from Redis
when it answers. Same conventions as the other commands: `--json`, `--yes`, exit codes.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import click

from speechgate.cli.common import (
    Failed,
    announce,
    audit,
    confirm,
    json_option,
    operator,
    output,
    run,
    yes_option,
)
from speechgate.core import speechkeys
from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import REDIS_ERRORS, Redis
from speechgate.core.settings import Settings
from speechgate.core.store import SecretStore
from speechgate.core.upstreams import (
    PoolError,
    Upstream,
    check_pool,
    find,
    key_secret,
    load_pool,
    save_pool,
    with_state,
)


@click.group()
def upstreams() -> None:
    """The Azure Speech resources streams are routed over, with their limits and zones."""


async def _live(redis: Redis | None, settings: Settings, pool: list[Upstream]) -> dict[str, dict[str, Any]]:
    """Each upstream's live streams (fleet-wide) and health, from Redis; empty without it."""
    if redis is None or not pool:
        return {}
    keys = Keyspace(settings.redis_prefix)
    now = int(time.time() * 1000)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for upstream in pool:
                pipe.zcount(keys.upstream_live(upstream.name), now, "+inf")
                pipe.pttl(keys.upstream_down(upstream.name))
            found = await pipe.execute()
    except REDIS_ERRORS:
        return {}
    rows = {}
    for i, upstream in enumerate(pool):
        down_for_s = max(0, int(found[2 * i + 1])) / 1000
        rows[upstream.name] = {"live": int(found[2 * i]), "healthy": not down_for_s, "down_for_s": down_for_s}
    return rows


async def pool_rows(store: SecretStore, redis: Redis | None, settings: Settings) -> list[dict[str, Any]]:
    """Every upstream, with its live streams and health when Redis answers."""
    pool = await load_pool(store)
    live = await _live(redis, settings, pool)
    return [_row(u, live.get(u.name)) for u in pool]


def _row(upstream: Upstream, live: dict[str, Any] | None) -> dict[str, Any]:
    """The definition, and its live streams and health (None: Redis did not say)."""
    return {**upstream.to_dict(), **(live or {"live": None, "healthy": None, "down_for_s": None})}


def _describe(row: dict[str, Any]) -> str:
    where = row["region"] or row["endpoint"] or "the relays' configured upstream"
    use = f"{row['live']}/{row['limit']} streams" if row["live"] is not None else f"limit {row['limit']}"
    health = f", down for {row['down_for_s']:.0f} s more" if row.get("down_for_s") else ""
    zone = f" zone {row['zone']}" if row["zone"] else ""
    return f"{row['name']:<16} {row['state']:<9} {use}{health} — {where}{zone}"


@upstreams.command("list")
@json_option
def list_upstreams(as_json: bool) -> None:
    """Every upstream with its state, live streams against its limit, and health."""

    rows = run(pool_rows, changes=False)
    text = "\n".join(_describe(r) for r in rows) or (
        "no pool: the relays use their configured upstream (SPEECH_REGION / SPEECHGATE_SPEECH_ENDPOINT)"
    )
    output(as_json, rows, text)


@upstreams.command("show")
@click.argument("name")
@json_option
def show(name: str, as_json: bool) -> None:
    """One upstream in full."""

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> dict[str, Any]:
        pool = await load_pool(store)
        upstream = find(pool, name)
        return _row(upstream, (await _live(redis, settings, [upstream])).get(name))

    row = run(op, changes=False)
    output(as_json, row, "\n".join(f"{k}: {v}" for k, v in row.items()))


@upstreams.command("add")
@click.argument("name")
@click.option(
    "--limit", type=click.IntRange(1, 100_000), required=True, help="Concurrent streams Azure allows it."
)
@click.option("--region", help="Azure region, e.g. westeurope.")
@click.option("--endpoint", help="wss:// base URL instead of a region (custom domain, sovereign cloud).")
@click.option("--key-stdin", is_flag=True, help="Read its Azure Speech key (key1) from standard input.")
@click.option(
    "--entra-resource-id", metavar="ID", help="Keyless with Entra ID: the Speech resource's ARM id."
)
@click.option("--zone", help="Data-residency zone, e.g. eu: clients restricted to zones stay in theirs.")
@click.option(
    "--label", "labels", multiple=True, metavar="NAME=VALUE", help="A label (repeat), e.g. tier=s0."
)
@click.option(
    "--service",
    "services",
    multiple=True,
    type=click.Choice(["stt", "tts", "s2s"]),
    help="Serves only these (repeat) [all].",
)
@click.option("--language", "languages", multiple=True, help="Serves only these locales (repeat) [any].")
@click.option("--drained", is_flag=True, help="Add it draining: no streams until `upstreams enable`.")
@json_option
def add(
    name: str,
    limit: int,
    region: str | None,
    endpoint: str | None,
    key_stdin: bool,
    entra_resource_id: str | None,
    zone: str | None,
    labels: tuple[str, ...],
    services: tuple[str, ...],
    languages: tuple[str, ...],
    drained: bool,
    as_json: bool,
) -> None:
    """Add an Azure Speech resource to the pool. Neither --region nor --endpoint: the relays'
    configured upstream joins the pool under NAME (its key or identity as configured)."""
    configured = region is None and endpoint is None
    if key_stdin and entra_resource_id:
        raise click.UsageError("give --key-stdin or --entra-resource-id, not both")
    if not configured and not key_stdin and not entra_resource_id:
        raise click.UsageError(
            "a resource needs its key (--key-stdin) or keyless access (--entra-resource-id)"
        )
    if configured and (key_stdin or entra_resource_id):
        raise click.UsageError("the configured upstream uses the relays' own key or identity: no --key-stdin")
    pairs = dict(label.partition("=")[::2] for label in labels)
    if any(not k or not v for k, v in pairs.items()):
        raise click.UsageError("a label is NAME=VALUE")
    try:
        upstream = Upstream(
            name=name,
            limit=limit,
            region=region,
            endpoint=endpoint,
            auth="entra" if entra_resource_id else "key",
            resource_id=entra_resource_id,
            zone=zone,
            labels=pairs,
            services=services,
            languages=languages,
            state="draining" if drained else "active",
        )
        upstream.check()
    except PoolError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        key = speechkeys.check_key_format(sys.stdin.readline()) if key_stdin else None
    except speechkeys.SpeechKeyError as exc:
        raise click.UsageError(f"--key-stdin: {exc}") from None

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> dict[str, Any]:
        pool = await load_pool(store)
        if any(u.name == name for u in pool):
            raise Failed(f"an upstream named {name} exists: `speechgate upstreams show {name}`")
        try:
            check_pool([*pool, upstream])
        except PoolError as exc:
            raise Failed(str(exc)) from None
        if key is not None:  # the key first: a pool entry never points at a missing key
            await store.set(key_secret(name), key, tags={"slot": "key1", "announced": "true"})
        await save_pool(store, [*pool, upstream], operator())
        await announce(redis, settings, "upstreams")
        return _row(upstream, None)

    row = run(op)
    audit("upstreams.add", upstream=name, limit=limit, zone=zone, region=region, endpoint=endpoint)
    output(as_json, row, f"added {_describe(row)}")


def _set_state(command: str, name: str, state: str, as_json: bool) -> None:
    """`upstreams enable|drain|disable NAME`: store the state, tell the relays, show the upstream."""

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> dict[str, Any]:
        pool = await load_pool(store)
        after = dataclasses.replace(find(pool, name), state=state)
        await save_pool(store, with_state(pool, name, state), operator())
        await announce(redis, settings, "upstreams")
        return _row(after, (await _live(redis, settings, [after])).get(name))

    row = run(op)
    audit(f"upstreams.{command}", upstream=name)
    output(as_json, row, _describe(row))


@upstreams.command("enable")
@click.argument("name")
@json_option
def enable(name: str, as_json: bool) -> None:
    """Route new streams to it again."""
    _set_state("enable", name, "active", as_json)


@upstreams.command("drain")
@click.argument("name")
@yes_option
@json_option
def drain(name: str, yes: bool, as_json: bool) -> None:
    """Maintenance: no new streams; live ones go on to their end (`list` shows them leave)."""
    confirm(yes, f"Send no new streams to {name}?")
    _set_state("drain", name, "draining", as_json)


@upstreams.command("disable")
@click.argument("name")
@yes_option
@json_option
def disable(name: str, yes: bool, as_json: bool) -> None:
    """Take it out of rotation until `enable` (live streams are not cut)."""
    confirm(yes, f"Take {name} out of rotation?")
    _set_state("disable", name, "disabled", as_json)


@upstreams.command("remove")
@click.argument("name")
@yes_option
@json_option
def remove(name: str, yes: bool, as_json: bool) -> None:
    """Remove it from the pool (drain it first: live streams are not cut, but no longer counted)."""
    confirm(yes, f"Remove {name} from the pool?")

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> dict[str, Any]:
        pool = await load_pool(store)
        upstream = find(pool, name)
        live = (await _live(redis, settings, [upstream])).get(name, {}).get("live", 0)
        await save_pool(store, [u for u in pool if u.name != name], operator())
        for version in await store.versions(key_secret(name)) if upstream.owns_key else []:
            await store.update(key_secret(name), version.version, enabled=False)
        await announce(redis, settings, "upstreams")
        return {"name": name, "removed": True, "live_streams": live}

    result = run(op)
    audit("upstreams.remove", upstream=name, live_streams=result["live_streams"])
    output(as_json, result, f"removed {name} ({result['live_streams']} live streams were on it)")
