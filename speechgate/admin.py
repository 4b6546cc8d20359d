"""`speechgate keys|clients|tokens`: the security team's commands.

Conventions: `--help` everywhere; `--json` prints one JSON object for scripts; destructive steps ask
for confirmation unless `--yes` (and refuse without a terminal); every change writes one JSON
audit line to stderr (who, what, when; never a secret). Exit codes: 0 done, 1 failed (store or
Redis unreachable, Azure refused), 2 bad usage, 3 not found, 4 not confirmed, 5 cannot start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click
import httpx
from redis.exceptions import RedisError

from token_service import clients as clientdb
from token_service import keys as signing
from token_service import speechkeys
from token_service.claims import SCOPES
from token_service.clients import ClientPolicy, IdentityProvider, PolicyError, RateLimits
from token_service.events import publish
from token_service.keyspace import Keyspace
from token_service.redisconn import REDIS_ERRORS, Redis
from token_service.revocation import RedisRevocations
from token_service.runtime import open_redis, open_store
from token_service.settings import Settings, SettingsError
from token_service.store import SecretDisabled, SecretNotFound, SecretStore, StoreError

# One meaning per code, across every command (listed in `speechgate --help`).
EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_DECLINED, EXIT_CANNOT_START = 1, 2, 3, 4, 5
EXIT_CODES = """Exit codes: 0 done; 1 failed (the store, Redis or Azure refused or is unreachable; the
message says what changed); 2 bad usage (an option or argument); 3 not found (a client, a key);
4 not confirmed; 5 cannot start (an invalid setting, a port in use, no signing key)."""
T = TypeVar("T")


@dataclass
class Deps:
    """What the commands work on; tests hand in their own (a fake vault, a private Redis)."""

    open_store: Callable[[Settings], SecretStore] = open_store
    open_redis: Callable[[Settings], Redis | None] = open_redis
    http: Callable[[], httpx.AsyncClient] = httpx.AsyncClient
    mgmt_options: dict[str, Any] = field(default_factory=dict)  # for the Azure management client
    settings: Settings | None = None

    def get_settings(self) -> Settings:
        if self.settings is None:
            try:
                self.settings = Settings.from_env()
            except SettingsError as exc:
                raise Failed(str(exc), EXIT_CANNOT_START) from None
            if self.settings.redis_url is None:  # a running `speechgate dev`'s private Redis
                from speechgate.dev import running_state

                state = running_state(self.settings.store_dir)
                if state is not None and state.redis_url:
                    self.settings = dataclasses.replace(self.settings, redis_url=state.redis_url)
        return self.settings


class Failed(click.ClickException):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]


def operator() -> str:
    return os.environ.get("SPEECHGATE_OPERATOR") or f"{getpass.getuser()}@{socket.gethostname()}"


def audit(action: str, **details: Any) -> None:
    line = {
        "audit": action,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": operator(),
        **details,
    }
    click.echo(json.dumps(line, sort_keys=True), err=True)


def deps() -> Deps:
    ctx = click.get_current_context()
    found = ctx.find_object(Deps)
    return found if found is not None else ctx.ensure_object(Deps)


def run(operation: Callable[[SecretStore, Redis | None, Settings], Awaitable[T]], changes: bool = True) -> T:
    """Open the store and Redis inside one event loop, run, close; store errors become exits.

    A command that `changes` something checks first that the configured Redis answers, so that it
    never changes the store and then fails to tell the services (or to write Redis' part): with
    Redis away, nothing is changed and the command says so."""
    dependencies = deps()
    settings = dependencies.get_settings()

    async def go() -> T:
        store = dependencies.open_store(settings)
        redis = dependencies.open_redis(settings)
        try:
            if changes and redis is not None:
                try:
                    await redis.ping()
                except REDIS_ERRORS as exc:
                    raise Failed(
                        f"Redis unreachable ({type(exc).__name__}): nothing was changed; check "
                        "SPEECHGATE_REDIS_URL / REDIS_URL, then run the command again"
                    ) from None
            return await operation(store, redis, settings)
        finally:
            await store.close()
            if redis is not None:
                await redis.aclose()

    try:
        return asyncio.run(go())
    except SecretNotFound as exc:
        raise Failed(str(exc), EXIT_NOT_FOUND) from None
    except (StoreError, PolicyError) as exc:
        raise Failed(str(exc)) from None
    except REDIS_ERRORS as exc:
        then = "then run the command again: it finishes what was begun" if changes else "then retry"
        raise Failed(
            f"Redis unreachable ({type(exc).__name__}); check SPEECHGATE_REDIS_URL / REDIS_URL, {then}"
        ) from None


async def announce(redis: Redis | None, settings: Settings, what: str) -> bool:
    """Tell every running service to reload; False (with a warning) when there is no Redis."""
    if redis is None:
        click.echo(
            f"warning: no Redis configured; services pick the change up within "
            f"{int(settings.key_refresh_s)} s (keys) or {int(settings.client_cache_s)} s (clients)",
            err=True,
        )
        return False
    try:
        await publish(redis, Keyspace(settings.redis_prefix), {"type": "reload", "what": what})
    except RedisError as exc:  # the change is made: say so, and when the services see it anyway
        click.echo(
            f"warning: the change is made, but the reload event could not be sent ({type(exc).__name__}); "
            f"services pick it up within {int(settings.key_refresh_s)} s (keys) or "
            f"{int(settings.client_cache_s)} s (clients)",
            err=True,
        )
        return False
    return True


def confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise Failed(f"{question} Not confirmed: add --yes to run this without a terminal.", EXIT_DECLINED)
    if not click.confirm(question, default=False):
        raise Failed("not confirmed; nothing changed", EXIT_DECLINED)


def output(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data, indent=1, sort_keys=True) if as_json else text)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
yes_option = click.option("--yes", is_flag=True, help="Do not ask for confirmation.")


def _age(created: int) -> str:
    return _duration(int(time.time()) - created)


def _duration(seconds: int) -> str:
    seconds = max(0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# --- keys ----------------------------------------------------------------------------------


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
@yes_option
@json_option
def rotate_speech(
    from_stdin: bool,
    azure_resource: str | None,
    verify: bool,
    region: str | None,
    sts_endpoint: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Dual-key rotation: regenerate the slot not in use, store it, tell the relays to reload."""
    if from_stdin == bool(azure_resource):
        raise click.UsageError("give exactly one of --from-stdin or --azure-resource")
    confirm(yes, "Regenerate the Azure Speech key that is not in use and switch the relays to it?")
    pasted = sys.stdin.readline() if from_stdin else ""

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> dict[str, Any]:
        async with deps().http() as http:

            async def new_key(slot: str) -> str:
                if from_stdin:
                    return pasted
                from speechgate.azure_mgmt import regenerate_key

                assert azure_resource is not None
                return await regenerate_key(azure_resource, slot, **deps().mgmt_options)

            async def check(key: str) -> None:
                await speechkeys.verify_with_sts(key, speechkeys.sts_base_for(region, sts_endpoint), http)

            async def tell() -> None:
                await announce(redis, settings, "speech-key")

            tags = {k: v for k, v in (("region", region), ("resource", azure_resource)) if v}
            result = await speechkeys.rotate_speech_key(
                store, new_key, tell, rotated_by=operator(), verify=check if verify else None, tags=tags
            )
        return dataclasses.asdict(result)

    result = run(op)
    audit(
        "keys.rotate-speech",
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


# --- clients -------------------------------------------------------------------------------


@click.group()
def clients() -> None:
    """Apps that may ask for tokens, and their limits."""


def names(listed: str) -> list[str]:
    """A comma-separated option's names; empty for none."""
    return [name.strip() for name in listed.split(",") if name.strip()]


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


def escaped(text: str) -> str:
    """Control characters as escapes: names from tokens reach a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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


# --- tokens --------------------------------------------------------------------------------


@click.group()
def tokens() -> None:
    """Revoke tokens and close their streams."""


@tokens.command("revoke")
@click.option("--jti", help="One token, by its jti.")
@click.option("--subject", help="Every token of this subject (with --client).")
@click.option("--client", "client_id", help="Every token of this client, or of --subject in it.")
@yes_option
@json_option
def tokens_revoke(
    jti: str | None, subject: str | None, client_id: str | None, yes: bool, as_json: bool
) -> None:
    """Deny tokens at the relays' handshake and close their live streams."""
    if (jti and (subject or client_id)) or not (jti or client_id) or (subject and not client_id):
        raise click.UsageError("use --jti ID, or --subject SUB --client ID, or --client ID")
    what = (
        f"token {jti}" if jti else f"subject {subject} of {client_id}" if subject else f"client {client_id}"
    )
    confirm(yes, f"Revoke every token of {what}?" if not jti else f"Revoke {what}?")

    async def op(store: SecretStore, redis: Redis | None, settings: Settings) -> int:
        if redis is None:
            raise Failed("revocation needs Redis: set SPEECHGATE_REDIS_URL or REDIS_URL")
        if client_id:
            policy = await clientdb.load_client(store, client_id)
            ttl = policy.token_ttl_s + policy.max_session_s
        else:
            ttl = await clientdb.longest_token_use_s(store)
        revocations = RedisRevocations(redis, Keyspace(settings.redis_prefix))
        if jti:
            await revocations.revoke_jti(jti, int(time.time()) + ttl)
        elif subject:
            assert client_id is not None
            await revocations.revoke_subject(client_id, subject, ttl)
        else:
            assert client_id is not None
            await revocations.revoke_client(client_id, ttl)
        return ttl

    ttl = run(op)
    audit("tokens.revoke", jti=jti, subject=subject, client_id=client_id, ttl_s=ttl)
    output(as_json, {"revoked": what, "ttl_s": ttl}, f"revoked {what} (denied for {ttl} s)")
