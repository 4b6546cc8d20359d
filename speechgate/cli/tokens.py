"""`speechgate tokens revoke`: deny tokens at the relays' handshake and close their streams."""

from __future__ import annotations

import time

import click

from speechgate.cli.common import (
    Failed,
    audit,
    confirm,
    json_option,
    output,
    run,
    yes_option,
)
from speechgate.core import clients as clientdb
from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import Redis
from speechgate.core.revocation import RedisRevocations
from speechgate.core.settings import Settings
from speechgate.core.store import SecretStore


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
    # The record is kept as long as a token issued before it may still be used; it denies those,
    # and no token issued after it ("denied for 3900 s" once read as a lockout).
    scope = "it" if jti else "every token issued until now"
    after = "" if jti else "; tokens issued from now on work"
    output(
        as_json,
        {"revoked": what, "ttl_s": ttl},
        f"revoked {what}: {scope} is refused at the relays and its live streams close{after} "
        f"(the record is kept {ttl} s, the longest such a token may be used)",
    )
