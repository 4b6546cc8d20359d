"""`speechgate keys`: the signing keys and the Azure Speech key, rotated and revoked."""

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
    deps,
    json_option,
    operator,
    output,
    run,
    yes_option,
)
from speechgate.core import clients as clientdb
from speechgate.core import keys as signing
from speechgate.core import speechkeys, upstreams
from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import Redis
from speechgate.core.revocation import RedisRevocations
from speechgate.core.settings import Settings
from speechgate.core.store import SecretNotFound, SecretStore


def _age(created: int) -> str:
    return _duration(int(time.time()) - created)


def _duration(seconds: int) -> str:
    seconds = max(0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@click.group()
def keys() -> None:
    """Signing keys and the Azure Speech key."""


LISTED_TAGS = (
    "kid",
    "state",
    "signs-from",
    "retire-after",
    "revoked-at",
    "revoked-by",
    "slot",
    "rotated-at",
    "rotated-by",
)


@keys.command("list")
@json_option
def keys_list(as_json: bool) -> None:
    """Versions, slots, kids, states and ages; never a secret value."""

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name in (signing.SIGNING_KEY_SECRET, speechkeys.SPEECH_KEY_SECRET):
            try:
                versions = await store.versions(name)
            except SecretNotFound:
                versions = []
            enabled = [v for v in versions if v.enabled]
            signer = signing.signing_now(enabled, time.time()) if enabled else None
            found[name] = [
                {
                    "version": v.version,
                    "enabled": v.enabled,
                    "created": v.created,
                    "age": _age(v.created),
                    **({"signing": v is signer} if name == signing.SIGNING_KEY_SECRET else {}),
                    **{k: v.tags[k] for k in LISTED_TAGS if k in v.tags},
                }
                for v in versions
            ]
        return found

    found = run(op, changes=False)
    lines = []
    now = int(time.time())
    for name, versions in found.items():
        lines.append(f"{name}: {len(versions)} version(s)")
        for item in reversed(versions):
            label = item.get("kid") or item.get("slot") or ""
            state = item.get("state") or ("enabled" if item["enabled"] else "disabled")
            if item.get("signing"):
                state = "signing"
            elif item["enabled"] and int(item.get("signs-from", 0)) > now:
                state = f"next, signs in {_duration(int(item['signs-from']) - now)}"
            lines.append(f"  {item['version']}  {label:<44} {state:<9} {item['age']:>5} old")
    output(as_json, found, "\n".join(lines))


@keys.command("init")
@json_option
def keys_init(as_json: bool) -> None:
    """Create the first signing key and the secret-hash key if the store has none (idempotent:
    a deployment runs it before the services start)."""

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> dict[str, Any]:
        try:
            await signing.load_keyring(store)
            created = False
        except signing.NoSigningKey:
            await signing.ensure_signing_key(store)
            created = True
        await clientdb.ensure_hash_key(store)
        return {"created": created, "signer_kid": (await signing.load_keyring(store)).signer.kid}

    result = run(op)
    if result["created"]:
        audit("keys.init", signer_kid=result["signer_kid"])
    text = ("created the first signing key " if result["created"] else "already set up; signing with ") + str(
        result["signer_kid"]
    )
    output(as_json, result, text)


@keys.command("rotate-signing")
@click.option(
    "--grace",
    type=int,
    default=None,
    help="Seconds the previous key stays published [longest token lifetime + session of any client].",
)
@click.option(
    "--publish-delay",
    type=click.IntRange(min=0),
    default=None,
    help="Seconds the new key is published before it signs, so every replica serves it by then "
    "[twice SPEECHGATE_KEY_REFRESH_S: how often services re-read the store if they miss the event].",
)
@json_option
def rotate_signing(grace: int | None, publish_delay: int | None, as_json: bool) -> None:
    """A new ES256 key is published now and signs after --publish-delay; the previous one signs
    until then and verifies until its tokens expired."""

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> dict[str, Any]:
        grace_s = grace if grace is not None else await clientdb.longest_token_use_s(store)
        publish_s = publish_delay if publish_delay is not None else int(2 * settings.key_refresh_s)
        result = await signing.rotate_signing_key(store, grace_s, publish_s)
        announced = await announce(redis, settings, "signing-key")
        return {**dataclasses.asdict(result), "grace_s": grace_s, "announced": announced}

    result = run(op)
    audit(
        "keys.rotate-signing",
        signer_kid=result["signer_kid"],
        previous=result["previous_kids"],
        retired=result["retired_kids"],
        finished_interrupted_run=not result["created"],
        signs_from=result["signs_from"],
    )
    wait_s = result["signs_from"] - int(time.time())
    text = (
        (
            f"published {result['signer_kid']}; it signs in {wait_s} s"
            if wait_s > 0
            else f"signing with {result['signer_kid']}"
        )
        + ("" if result["created"] else " (finished an interrupted rotation)")
        + (
            f"; previous key(s) {', '.join(result['previous_kids'])} published for {result['grace_s']} s"
            + (" after that" if wait_s > 0 else " more")
            if result["previous_kids"]
            else ""
        )
    )
    output(as_json, result, text)


@keys.command("prune")
@yes_option
@json_option
def prune(yes: bool, as_json: bool) -> None:
    """Disable the signing keys whose tokens have all expired."""
    confirm(yes, "Disable every previous signing key whose grace period is over?")

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> dict[str, Any]:
        retired = await signing.prune_signing_keys(store)
        if retired:
            await announce(redis, settings, "signing-key")
        return {"retired_kids": retired}

    result = run(op)
    if result["retired_kids"]:
        audit("keys.prune", retired=result["retired_kids"])
    output(as_json, result, f"retired: {', '.join(result['retired_kids']) or 'nothing due'}")


@keys.command("revoke-signing")
@click.option("--kid", required=True, help="The key's kid (`speechgate keys list`); kids may begin with '-'.")
@yes_option
@json_option
def revoke_signing(kid: str, yes: bool, as_json: bool) -> None:
    """A signing key leaked: refuse every token it signed, now. Its version is disabled (another
    key signs first if it was the signer), the relays refuse its tokens at the handshake and close
    the streams they opened, and its kid stays refused for good."""
    confirm(yes, f"Revoke signing key {kid}? Every token it signed stops working and its streams close.")

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> dict[str, Any]:
        if redis is None:  # only Redis reaches every relay, and keeps the kid refused
            raise Failed("revoking a signing key needs Redis: set SPEECHGATE_REDIS_URL or REDIS_URL")
        result = await signing.revoke_signing_key(store, kid, operator())
        await RedisRevocations(redis, Keyspace(settings.redis_prefix)).revoke_signing_key(kid)
        await announce(redis, settings, "signing-key")  # services reload: a new signer, a smaller JWKS
        return dataclasses.asdict(result)

    result = run(op)
    audit("keys.revoke-signing", kid=kid, version=result["version"], new_signer_kid=result["new_signer_kid"])
    text = (
        f"revoked signing key {kid}"
        + ("" if result["was_enabled"] else " (it was disabled already)")
        + (f"; signing with {result['new_signer_kid']} now" if result["new_signer_kid"] else "")
        + "; relays refuse its tokens and close their streams"
    )
    output(as_json, result, text)


@keys.command("rotate-speech")
@click.option("--from-stdin", is_flag=True, help="Read the regenerated key from standard input (portal).")
@click.option(
    "--azure-resource",
    metavar="ID",
    help="Regenerate through the Azure management API: the Speech resource's ARM id.",
)
@click.option("--verify", is_flag=True, help="Check the new key against the region's STS before storing it.")
@click.option("--region", envvar="SPEECH_REGION", help="Azure region of the resource [SPEECH_REGION].")
@click.option("--sts-endpoint", envvar="SPEECHGATE_STS_ENDPOINT", help="STS base URL [region's own].")
@click.option("--upstream", metavar="NAME", help="The key of this upstream of the pool [the configured one].")
@yes_option
@json_option
def rotate_speech(
    from_stdin: bool,
    azure_resource: str | None,
    verify: bool,
    region: str | None,
    sts_endpoint: str | None,
    upstream: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Dual-key rotation: regenerate the slot not in use, store it, tell the relays to reload."""
    if from_stdin == bool(azure_resource):
        raise click.UsageError("give exactly one of --from-stdin or --azure-resource")
    whose = f"{upstream}'s Azure Speech key" if upstream else "the Azure Speech key"
    confirm(yes, f"Regenerate {whose} that is not in use and switch the relays to it?")
    pasted = sys.stdin.readline() if from_stdin else ""

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> dict[str, Any]:
        async with deps().http() as http:

            async def new_key(slot: str) -> str:
                if from_stdin:
                    return pasted
                from speechgate.cli.azure_mgmt import regenerate_key

                assert azure_resource is not None
                return await regenerate_key(azure_resource, slot, **deps().mgmt_options)

            async def check(key: str) -> None:
                await speechkeys.verify_with_sts(key, speechkeys.sts_base_for(region, sts_endpoint), http)

            async def tell() -> None:
                await announce(redis, settings, "speech-key")

            tags = {k: v for k, v in (("region", region), ("resource", azure_resource)) if v}
            secret = speechkeys.SPEECH_KEY_SECRET
            if upstream is not None:
                found = upstreams.find(await upstreams.load_pool(store), upstream)
                if not found.owns_key:
                    raise Failed(
                        f"{upstream} has no key of its own (it uses the relays' configured one or Entra ID)"
                    )
                secret = upstreams.key_secret(upstream)
            result = await speechkeys.rotate_speech_key(
                store,
                new_key,
                tell,
                rotated_by=operator(),
                verify=check if verify else None,
                tags=tags,
                secret=secret,
            )
        return dataclasses.asdict(result)

    result = run(op)
    audit(
        "keys.rotate-speech",
        upstream=upstream,
        slot=result["slot"],
        version=result["version"],
        verified=verify,
        finished_interrupted_run=result["finished_previous"],
    )
    output(
        as_json,
        result,
        f"speech key now {result['slot']} (version {result['version']})"
        + (" — finished an interrupted rotation" if result["finished_previous"] else ""),
    )
