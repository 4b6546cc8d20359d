"""What every `speechgate` command shares: the conventions of the security and SRE commands.

`--help` everywhere; `--json` prints one JSON object for scripts; destructive steps ask for
confirmation unless `--yes` (and refuse without a terminal); every change writes one JSON audit line
to stderr (who, what, when; never a secret). Exit codes: 0 done, 1 failed (store or Redis
unreachable, Azure refused), 2 bad usage, 3 not found, 4 not confirmed, 5 cannot start.
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

from speechgate.core import logs
from speechgate.core.clients import PolicyError
from speechgate.core.events import publish
from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import REDIS_ERRORS, Redis
from speechgate.core.runtime import open_redis, open_store
from speechgate.core.settings import Settings, SettingsError
from speechgate.core.store import SecretNotFound, SecretStore, StoreError

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
                from speechgate.devtools.dev import running_state

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


def names(listed: str) -> list[str]:
    """A comma-separated option's names; empty for none."""
    return [name.strip() for name in listed.split(",") if name.strip()]


def escaped(text: str) -> str:
    """Control characters as escapes: names from tokens reach a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def cannot_start(message: str) -> Failed:
    return Failed(message, EXIT_CANNOT_START)


def load_settings() -> Settings:
    """The settings from the environment, and logging configured by them; a bad one: exit 5."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise cannot_start(str(exc)) from None
    logs.configure(settings.log_level, settings.log_format)
    return settings
