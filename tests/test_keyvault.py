"""The Key Vault store through the real SDK and DefaultAzureCredential, against the local fake."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from speechgate.core.clients import save_client
from speechgate.core.keyvault import KeyVaultStore
from speechgate.core.store import SecretNotFound, StoreError, StoreUnavailable
from tests.support.processes import wait_until
from tests.support.services import TokenService, new_client, prepare
from tests.support.vault import Vault


async def test_all_versions_are_listed_across_pages_with_the_newest_last(vault: Vault) -> None:
    store = vault.store()
    written = [(await store.set("many", f"v{n}")).version for n in range(5)]  # 3 pages of 2
    listed = [v.version for v in await store.versions("many")]
    # Versions made in one second cannot be ordered by Key Vault's times; the newest always can.
    assert sorted(listed) == sorted(written)
    assert listed[-1] == written[-1]
    assert (await store.get("many")).value == "v4"
    await store.close()
    assert vault.fake.tokens  # DefaultAzureCredential fetched a token from the identity endpoint


FAILURES: dict[int, tuple[type[Exception], str]] = {
    401: (StoreUnavailable, "refused our credentials"),
    403: (StoreUnavailable, "Key Vault Secrets"),
    404: (SecretNotFound, "not found"),
    429: (StoreUnavailable, "throttling"),
    500: (StoreUnavailable, "answered 500"),
    503: (StoreUnavailable, "answered 503"),
}


@pytest.mark.parametrize("status", list(FAILURES))
async def test_vault_errors_become_clear_store_errors(vault: Vault, status: int) -> None:
    store = vault.store()
    await store.set("api-key", "top-secret-value")
    vault.fake.fail_with = status
    kind, words = FAILURES[status]
    with pytest.raises(kind, match=words) as info:
        await store.get("api-key")
    assert "top-secret-value" not in str(info.value)
    await store.close()


async def test_unreachable_vault_is_store_unavailable(vault: Vault) -> None:
    store = KeyVaultStore(
        "https://127.0.0.1:1",
        verify_challenge_resource=False,
        retry_total=0,
        connection_verify=str(vault.ca_path),
    )
    with pytest.raises(StoreUnavailable, match="unreachable"):
        await store.get("anything")
    await store.close()


def test_vault_url_must_be_https() -> None:
    with pytest.raises(StoreError, match="https://"):
        KeyVaultStore("http://vault.example")


def test_tokens_keep_being_issued_while_the_vault_is_down(vault: Vault, start_service: Any) -> None:
    async def setup() -> tuple[str, str]:
        store = vault.store()
        policy, secret = new_client(await prepare(store))
        await save_client(store, policy)
        await store.close()
        return policy.client_id, secret

    client_id, secret = asyncio.run(setup())
    service: TokenService = start_service(store=vault.store(), client_cache_s=0.0, key_refresh_s=0.1)
    assert service.token(client_id, secret).status_code == 200
    assert service.http.get("/readyz").json()["checks"]["key_store"] == "ok"

    vault.fake.fail_with = 503
    for _ in range(5):
        assert service.token(client_id, secret).status_code == 200
    assert wait_until(lambda: service.http.get("/readyz").json()["status"] == "degraded")
    assert service.http.get("/readyz").json()["checks"]["key_store"].startswith("unreachable")
    assert "speechgate_key_store_up 0.0" in service.http.get("/metrics").text

    vault.fake.fail_with = None
    assert wait_until(lambda: service.http.get("/readyz").json()["status"] == "ready")

    vault.server.__exit__(None, None, None)  # the vault is gone altogether
    for _ in range(5):
        assert service.token(client_id, secret).status_code == 200
    assert wait_until(lambda: service.http.get("/readyz").json()["status"] == "degraded")
