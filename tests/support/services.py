"""A token service under test: a prepared store, clients in it, and the running service's handles."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

import httpx

from speechgate.core.clients import ClientPolicy, ensure_hash_key, hash_secret, new_client_secret, save_client
from speechgate.core.keys import ensure_signing_key
from speechgate.core.settings import Settings
from speechgate.core.store import MemoryStore, SecretStore
from tests.support.servers import ServerThread


async def prepare(store: SecretStore) -> bytes:
    """A signing key and the client-hash key, as `speechgate dev` leaves a store; the hash key."""
    await ensure_signing_key(store)
    return await ensure_hash_key(store)


def prepared_store(store: SecretStore | None = None) -> tuple[SecretStore, bytes]:
    target: SecretStore = store if store is not None else MemoryStore()
    return target, asyncio.run(prepare(target))


def new_client(
    hash_key: bytes, client_id: str | None = None, public: bool = False, **fields: Any
) -> tuple[ClientPolicy, str]:
    """A client policy and its secret (empty for a public client)."""
    client_id = client_id or f"app-{secrets.token_hex(4)}"
    secret = "" if public else new_client_secret()
    secret_hash = None if public else hash_secret(hash_key, client_id, secret)
    policy = ClientPolicy.from_dict({"client_id": client_id, "secret_hash": secret_hash, **fields})
    return policy, secret


def add_client(
    store: SecretStore, hash_key: bytes, client_id: str | None = None, public: bool = False, **fields: Any
) -> tuple[str, str]:
    """Register a client; returns (client_id, secret), the secret empty for a public client."""
    policy, secret = new_client(hash_key, client_id, public, **fields)
    asyncio.run(save_client(store, policy))
    return policy.client_id, secret


@dataclass
class TokenService:
    """A running token service and the handles a test needs around it."""

    server: ServerThread
    http: httpx.Client
    store: SecretStore
    hash_key: bytes
    settings: Settings
    app: Any = field(repr=False)

    @property
    def url(self) -> str:
        return self.server.url

    def add_client(
        self, client_id: str | None = None, public: bool = False, **fields: Any
    ) -> tuple[str, str]:
        return add_client(self.store, self.hash_key, client_id, public, **fields)

    def token(self, client_id: str, secret: str, **params: str) -> httpx.Response:
        return self.http.post(
            "/v1/token", auth=(client_id, secret), data={"grant_type": "client_credentials", **params}
        )
