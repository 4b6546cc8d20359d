"""The Azure Key Vault store: `SecretStore` on the async `azure-keyvault-secrets` client.

Credentials come from `DefaultAzureCredential` (managed or workload identity in production,
`az login` on a laptop). Errors become the store's own: SecretNotFound, SecretDisabled, and
StoreUnavailable with a message that says what to check; never a secret value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.identity.aio import DefaultAzureCredential
from azure.keyvault.secrets import KeyVaultSecret, SecretProperties
from azure.keyvault.secrets.aio import SecretClient

from speechgate.core.store import SecretDisabled, SecretNotFound, SecretVersion, StoreError, StoreUnavailable


def _seconds(value: datetime | None) -> int:
    return int(value.timestamp()) if value else 0


def _version(props: SecretProperties, value: str | None) -> SecretVersion:
    return SecretVersion(
        name=props.name or "",
        version=props.version or "",
        value=value,
        tags=dict(props.tags or {}),
        enabled=bool(props.enabled),
        created=_seconds(props.created_on),
        updated=_seconds(props.updated_on),
        content_type=props.content_type,
    )


def _secret(secret: KeyVaultSecret) -> SecretVersion:
    return _version(secret.properties, secret.value)


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    try:
        yield
    except ResourceNotFoundError:
        raise SecretNotFound(f"{what}: not found in Key Vault") from None
    except ClientAuthenticationError as exc:
        raise StoreUnavailable(
            f"{what}: Key Vault refused our credentials ({exc.status_code or 'no token'}); check the "
            "identity (az login, managed or workload identity) and its role on the vault"
        ) from None
    except HttpResponseError as exc:
        inner = str(getattr(exc.error, "innererror", "") or "") + (exc.message or "")
        if exc.status_code == 403 and "SecretDisabled" in inner:
            raise SecretDisabled(f"{what}: this version is disabled") from None
        if exc.status_code == 403:
            raise StoreUnavailable(
                f"{what}: Key Vault denied access (403); the identity needs the "
                "'Key Vault Secrets Officer' role (CLI) or 'Key Vault Secrets User' (services)"
            ) from None
        if exc.status_code == 429:
            raise StoreUnavailable(f"{what}: Key Vault is throttling requests (429); retry later") from None
        raise StoreUnavailable(
            f"{what}: Key Vault answered {exc.status_code} {exc.reason or ''}".strip()
        ) from None
    except AzureError as exc:
        raise StoreUnavailable(f"{what}: Key Vault unreachable ({type(exc).__name__})") from None


class KeyVaultStore:
    """A SecretStore in Azure Key Vault. `client_options` go to `SecretClient` (tests only)."""

    def __init__(
        self,
        vault_url: str,
        credential: AsyncTokenCredential | None = None,
        **client_options: Any,
    ) -> None:
        if not vault_url.startswith("https://"):
            raise StoreError("the Key Vault URL must start with https://")
        self.vault_url = vault_url
        self._owns_credential = credential is None
        self._credential: AsyncTokenCredential = credential or DefaultAzureCredential()
        self._client = SecretClient(vault_url, self._credential, **client_options)

    async def get(self, name: str, version: str | None = None) -> SecretVersion:
        with _errors(f"secret {name!r}"):
            return _secret(await self._client.get_secret(name, version))

    async def set(
        self,
        name: str,
        value: str,
        *,
        tags: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> SecretVersion:
        with _errors(f"secret {name!r}"):
            stored = await self._client.set_secret(
                name, value, tags=dict(tags or {}), content_type=content_type
            )
        return _secret(stored)

    async def versions(self, name: str) -> list[SecretVersion]:
        with _errors(f"secret {name!r}"):
            items = [_version(p, None) async for p in self._client.list_properties_of_secret_versions(name)]
            if not items:
                raise SecretNotFound(f"secret {name!r}: not found in Key Vault")
            # Key Vault lists in no promised order and times are whole seconds: ask which is newest.
            try:
                newest = (await self._client.get_secret(name)).properties.version
            except HttpResponseError:
                newest = None  # the newest version is disabled; creation times must do
        items.sort(key=lambda v: (v.version == newest, v.created, v.updated))
        return items

    async def update(
        self,
        name: str,
        version: str,
        *,
        enabled: bool | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> SecretVersion:
        with _errors(f"secret {name!r} version {version}"):
            props = await self._client.update_secret_properties(
                name, version, enabled=enabled, tags=None if tags is None else dict(tags)
            )
        return _version(props, None)

    async def names(self) -> list[str]:
        with _errors("listing secrets"):
            return sorted([p.name async for p in self._client.list_properties_of_secrets() if p.name])

    async def close(self) -> None:
        await self._client.close()
        if self._owns_credential:
            await self._credential.close()
