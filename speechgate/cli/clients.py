"""`speechgate clients`: the apps that may ask for tokens, and their policies."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click

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
from speechgate.core import clients as clientdb
from speechgate.core.claims import SCOPES
from speechgate.core.clients import ClientPolicy, IdentityProvider, PolicyError, RateLimits
from speechgate.core.redisconn import Redis
from speechgate.core.settings import Settings
from speechgate.core.store import SecretDisabled, SecretNotFound, SecretStore


@click.group()
def clients() -> None:
    """Apps that may ask for tokens, and their limits."""


def _public_view(policy: ClientPolicy) -> dict[str, Any]:
    view = dataclasses.asdict(policy)
    view["type"] = "public" if policy.public else "confidential"
    del view["secret_hash"]
    return view


async def _store_secret(store: SecretStore, policy: ClientPolicy) -> tuple[ClientPolicy, str]:
    secret = clientdb.new_client_secret()
    hash_key = await clientdb.ensure_hash_key(store)
    updated = dataclasses.replace(
        policy, secret_hash=clientdb.hash_secret(hash_key, policy.client_id, secret)
    )
    await clientdb.save_client(store, updated)
    return updated, secret


@clients.command("add")
@click.argument("client_id")
@click.option("--name", default="", help="A human name.")
@click.option(
    "--public", is_flag=True, help="A mobile app without secret: token exchange only (needs --idp-*)."
)
@click.option("--idp-issuer", help="Identity provider issuer (public clients).")
@click.option("--idp-jwks-uri", help="Identity provider JWKS URL.")
@click.option("--idp-audience", help="Audience of the identity provider's tokens for this app.")
@click.option(
    "--idp-algorithm", "idp_algorithms", multiple=True, default=("RS256", "ES256"), show_default=True
)
@click.option("--scope", "scopes", multiple=True, help="Allowed scope (repeat) [all].")
@click.option("--language", "languages", multiple=True, help="Allowed locale (repeat) [any].")
@click.option("--token-ttl", type=int, default=300, show_default=True, help="Token lifetime, seconds.")
@click.option("--max-session", type=int, default=3600, show_default=True, help="Longest stream, seconds.")
@click.option("--rate-client", default=RateLimits.client, show_default=True)
@click.option("--rate-subject", default=RateLimits.subject, show_default=True)
@click.option("--rate-ip", default=RateLimits.ip, show_default=True)
@click.option(
    "--custom-models", default="", help="Custom Speech models (cid) it may use, comma-separated; * any."
)
@click.option("--custom-voices", default="", help="Custom voices (deploymentId) it may use, comma-separated.")
@click.option("--store-audio", is_flag=True, help="It may ask Azure to store its audio (storeAudio=true).")
@click.option("--origins", default="", help="Web origins whose pages may stream, comma-separated [any].")
@click.option("--zones", default="", help="Upstream pool zones its streams may use, comma-separated [any].")
@json_option
def clients_add(
    client_id: str,
    name: str,
    public: bool,
    idp_issuer: str | None,
    idp_jwks_uri: str | None,
    idp_audience: str | None,
    idp_algorithms: tuple[str, ...],
    scopes: tuple[str, ...],
    languages: tuple[str, ...],
    token_ttl: int,
    max_session: int,
    rate_client: str,
    rate_subject: str,
    rate_ip: str,
    custom_models: str,
    custom_voices: str,
    store_audio: bool,
    origins: str,
    zones: str,
    as_json: bool,
) -> None:
    """Register a client; a confidential client's secret is printed once, here."""
    idp = None
    if idp_issuer or idp_jwks_uri or idp_audience:
        if not (idp_issuer and idp_jwks_uri and idp_audience):
            raise click.UsageError("--idp-issuer, --idp-jwks-uri and --idp-audience go together")
        idp = IdentityProvider(idp_issuer, idp_jwks_uri, idp_audience, tuple(idp_algorithms))
    try:
        policy = ClientPolicy.from_dict(
            {
                "client_id": client_id,
                "name": name,
                "secret_hash": None if public else "pending",
                "scopes": list(scopes) or list(SCOPES),
                "languages": list(languages) or ["*"],
                "token_ttl_s": token_ttl,
                "max_session_s": max_session,
                "rate_limits": {"client": rate_client, "subject": rate_subject, "ip": rate_ip},
                "idp": dataclasses.asdict(idp) if idp else None,
                "custom_models": names(custom_models),
                "custom_voices": names(custom_voices),
                "store_audio": store_audio,
                "origins": names(origins),
                "zones": names(zones),
            }
        )
    except PolicyError as exc:
        raise click.UsageError(str(exc)) from None

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> tuple[ClientPolicy, str]:
        try:
            await store.get(clientdb.secret_name(client_id))
        except SecretNotFound:
            pass
        else:
            raise Failed(
                f"client {client_id!r} exists; use `speechgate clients rotate-secret` or pick another id"
            )
        if public:
            await clientdb.save_client(store, policy)
            return policy, ""
        return await _store_secret(store, policy)

    stored, secret = run(op)
    audit("clients.add", client_id=client_id, type="public" if public else "confidential")
    data = {**_public_view(stored), **({"client_secret": secret} if secret else {})}
    text = f"client {client_id} added"
    if secret:
        text += f"\nclient_secret: {secret}\nThis secret is shown once; only a hash of it is stored."
    output(as_json, data, text)


@clients.command("list")
@json_option
def clients_list(as_json: bool) -> None:
    """Every client, its type, state and scopes."""

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> list[ClientPolicy]:
        return await clientdb.all_clients(store)

    found = run(op, changes=False)
    rows = [
        f"{c.client_id:<32} {'public' if c.public else 'confidential':<13} "
        f"{'enabled' if c.enabled else 'DISABLED':<9} {' '.join(c.scopes)}"
        for c in found
    ]
    output(as_json, [_public_view(c) for c in found], "\n".join(rows) or "no clients")


@clients.command("show")
@click.argument("client_id")
@json_option
def clients_show(client_id: str, as_json: bool) -> None:
    """One client's policy (without its secret hash)."""

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> ClientPolicy:
        return await clientdb.load_client(store, client_id)

    view = _public_view(run(op, changes=False))
    output(as_json, view, "\n".join(f"{k}: {shown(v)}" for k, v in view.items()))


def shown(value: Any) -> str:
    """A policy value as a person reads it: lists joined, nothing as '-', objects as JSON."""
    if value is None or value == [] or value == ():
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(shown(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return escaped(str(value))


def _set_enabled(client_id: str, enabled: bool) -> None:
    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> None:
        try:
            policy = await clientdb.load_client(store, client_id)
        except SecretDisabled:
            raise Failed(
                f"client {client_id!r} is disabled in the store itself; enable its latest version"
            ) from None
        await clientdb.save_client(store, dataclasses.replace(policy, enabled=enabled))
        await announce(redis, settings, "client")

    run(op)
    audit("clients.enable" if enabled else "clients.disable", client_id=client_id)


@clients.command("disable")
@click.argument("client_id")
@yes_option
@json_option
def clients_disable(client_id: str, yes: bool, as_json: bool) -> None:
    """Refuse new tokens to a client (revoke its live tokens with `speechgate tokens revoke --client`)."""
    confirm(yes, f"Disable client {client_id}?")
    _set_enabled(client_id, False)
    output(as_json, {"client_id": client_id, "enabled": False}, f"client {client_id} disabled")


@clients.command("enable")
@click.argument("client_id")
@json_option
def clients_enable(client_id: str, as_json: bool) -> None:
    """Let a disabled client get tokens again."""
    _set_enabled(client_id, True)
    output(as_json, {"client_id": client_id, "enabled": True}, f"client {client_id} enabled")


@clients.command("rotate-secret")
@click.argument("client_id")
@yes_option
@json_option
def clients_rotate_secret(client_id: str, yes: bool, as_json: bool) -> None:
    """A new secret, printed once; the old one stops working at once."""
    confirm(yes, f"Replace the secret of {client_id}? The old one stops working at once.")

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> str:
        policy = await clientdb.load_client(store, client_id)
        if policy.public:
            raise Failed(f"client {client_id!r} is public: it has no secret")
        _, secret = await _store_secret(store, policy)
        await announce(redis, settings, "client")
        return secret

    secret = run(op)
    audit("clients.rotate-secret", client_id=client_id)
    output(
        as_json,
        {"client_id": client_id, "client_secret": secret},
        f"client_secret: {secret}\nThis secret is shown once; only a hash of it is stored.",
    )
