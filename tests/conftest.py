"""Shared fixtures: a real Redis, an in-memory secret store, the token service on a real socket."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
import redis

from speechgate.core.redisconn import connect
from speechgate.core.settings import Settings
from speechgate.core.store import SecretStore
from speechgate.token_service.app import create_app, server_options
from tests.support.dev import offline_dev  # noqa: F401 - fixtures for every test module
from tests.support.js_sdk import node, sdk_versions  # noqa: F401
from tests.support.relays import stack, stack_factory  # noqa: F401
from tests.support.servers import ServerThread
from tests.support.services import TokenService, prepared_store
from tests.support.vault import vault  # noqa: F401

# The prefixes the suite writes under in a Redis it did not start (often a developer's own): the
# production one, which no test may touch, and the tests' own (the `prefix` fixture's and a few).
WATCHED_PREFIXES = ("sg:", "sgtest", "test:")


@pytest.fixture(scope="session", autouse=True)
def shared_redis_left_as_found(redis_url: str) -> Iterator[None]:
    """The suite leaves nothing in the shared Redis: each test deletes what it wrote under its own
    prefix, or uses a Redis server of its own. (A rate-limit key of the dev tests once stayed two
    hours in the developer's Redis.)"""
    client = redis.Redis.from_url(redis_url)

    def watched() -> set[bytes]:
        return {key for p in WATCHED_PREFIXES for key in client.scan_iter(match=f"{p}*", count=1000)}

    before = watched()
    yield
    left = watched() - before
    client.close()
    assert not left, f"the suite left {len(left)} keys in the Redis at {redis_url}: {sorted(left)[:5]}"


def pytest_report_header() -> str:
    return sdk_versions()


# Modules that run whole processes, browsers, the Speech SDKs or several Redis servers: marked
# `e2e`, so that `script/test -m "not e2e"` is the fast run (CONTRIBUTING.md).
E2E_MODULES = frozenset(
    {
        "test_cli_dev",
        "test_demo_browser",
        "test_deploy",
        "test_limits_hold",
        "test_offline",
        "test_redis_topologies",
        "test_relay_js",
        "test_relay_processes",
        "test_relay_sdk",
        "test_scale_out",
        "test_sdk_compat",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)


REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"the tests need Redis at {REDIS_URL} ({exc}); .ci/run starts one")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own, deleted afterwards: tests never see each other's counters."""
    value = f"sgtest-{secrets.token_hex(4)}:"
    yield value
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{value}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def start_service(prefix: str, redis_url: str) -> Iterator[Any]:
    """Start token services: `start_service(**settings)`; all are stopped after the test."""
    running: list[TokenService] = []

    def start(
        store: SecretStore | None = None, with_redis: bool = True, hash_key: bytes = b"", **overrides: Any
    ) -> TokenService:
        """A given store must be prepared already (it may belong to the server's event loop);
        pass its `hash_key` to register clients through the returned service."""
        if store is None:
            store, hash_key = prepared_store()
        overrides.setdefault("redis_url", redis_url if with_redis else None)
        settings = replace(Settings(redis_prefix=prefix), **overrides)
        redis_client = connect(settings.redis_url) if settings.redis_url else None
        app = create_app(settings, store, redis_client)
        listen = {"port": settings.port} if "port" in overrides else {}  # else any free port
        server = ServerThread(app, **server_options(settings), **listen).__enter__()
        service = TokenService(server, httpx.Client(base_url=server.url), store, hash_key, settings, app)
        running.append(service)
        return service

    yield start
    for service in running:
        service.http.close()
        service.server.__exit__(None, None, None)


@pytest.fixture
def service(start_service: Any) -> TokenService:
    started: TokenService = start_service()
    return started
