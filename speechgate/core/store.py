"""The secret store: every secret speechgate keeps (signing keys, Azure keys, client policies).

One interface, shaped after Azure Key Vault secrets so that the Key Vault implementation is a thin
adapter: a secret is a name with versions; each version has a value, tags, an enabled flag and
timestamps. Versions are never changed in place except for their tags and enabled flag.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable


class StoreError(Exception):
    """Base class of the store's errors; the message never holds a secret value."""


class SecretNotFound(StoreError):
    """No such secret, or no such version of it."""


class SecretDisabled(StoreError):
    """The version exists but is disabled (Key Vault answers 403 on reading it)."""


class StoreUnavailable(StoreError):
    """The store could not be reached or refused us (network, throttling, permissions)."""


@dataclass(frozen=True)
class SecretVersion:
    """One version of a secret. `value` is None in listings, which never carry values."""

    name: str
    version: str
    value: str | None
    tags: Mapping[str, str] = field(default_factory=dict)
    enabled: bool = True
    created: int = 0
    updated: int = 0
    content_type: str | None = None

    def properties(self) -> SecretVersion:
        """This version without its value, as listings return it."""
        return replace(self, value=None)


@runtime_checkable
class SecretStore(Protocol):
    """Where secrets live. Implementations: MemoryStore, FileStore, and Azure Key Vault."""

    async def get(self, name: str, version: str | None = None) -> SecretVersion:
        """The given version, or the newest one; raises SecretNotFound or SecretDisabled."""
        ...

    async def set(
        self,
        name: str,
        value: str,
        *,
        tags: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> SecretVersion:
        """Store `value` as the new newest version of `name` (creating the secret)."""
        ...

    async def versions(self, name: str) -> list[SecretVersion]:
        """Every version of `name` without values, by creation time (whole seconds in Key Vault)
        and always with the newest last."""
        ...

    async def update(
        self,
        name: str,
        version: str,
        *,
        enabled: bool | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> SecretVersion:
        """Change a version's enabled flag or replace its tags; returns it without value."""
        ...

    async def names(self) -> list[str]:
        """The names of all secrets, sorted."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def new_version_id() -> str:
    """A Key Vault-style version id: 32 lowercase hex digits."""
    return secrets.token_hex(16)


class VersionTable:
    """The bookkeeping shared by the in-process stores: name -> versions, oldest first."""

    def __init__(self, data: dict[str, list[SecretVersion]] | None = None) -> None:
        self.data: dict[str, list[SecretVersion]] = data if data is not None else {}

    def get(self, name: str, version: str | None) -> SecretVersion:
        found = self._find(name, version)
        if not found.enabled:
            raise SecretDisabled(f"secret {name!r} version {found.version} is disabled")
        return found

    def add(
        self, name: str, value: str, tags: Mapping[str, str] | None, content_type: str | None
    ) -> SecretVersion:
        now = int(time.time())
        entry = SecretVersion(
            name=name,
            version=new_version_id(),
            value=value,
            tags=dict(tags or {}),
            enabled=True,
            created=now,
            updated=now,
            content_type=content_type,
        )
        self.data.setdefault(name, []).append(entry)
        return entry

    def versions(self, name: str) -> list[SecretVersion]:
        if name not in self.data:
            raise SecretNotFound(f"secret {name!r} not found")
        return [v.properties() for v in self.data[name]]

    def update(
        self, name: str, version: str, enabled: bool | None, tags: Mapping[str, str] | None
    ) -> SecretVersion:
        found = self._find(name, version)
        changed = replace(
            found,
            enabled=found.enabled if enabled is None else enabled,
            tags=dict(found.tags) if tags is None else dict(tags),
            updated=int(time.time()),
        )
        items = self.data[name]
        items[items.index(found)] = changed
        return changed.properties()

    def names(self) -> list[str]:
        return sorted(self.data)

    def _find(self, name: str, version: str | None) -> SecretVersion:
        items = self.data.get(name)
        if not items:
            raise SecretNotFound(f"secret {name!r} not found")
        if version is None:
            return items[-1]
        for item in items:
            if item.version == version:
                return item
        raise SecretNotFound(f"secret {name!r} has no version {version!r}")


class MemoryStore:
    """A store that lives in this process only: for tests and throw-away runs."""

    def __init__(self) -> None:
        self._table = VersionTable()

    async def get(self, name: str, version: str | None = None) -> SecretVersion:
        return self._table.get(name, version)

    async def set(
        self,
        name: str,
        value: str,
        *,
        tags: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> SecretVersion:
        return self._table.add(name, value, tags, content_type)

    async def versions(self, name: str) -> list[SecretVersion]:
        return self._table.versions(name)

    async def update(
        self,
        name: str,
        version: str,
        *,
        enabled: bool | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> SecretVersion:
        return self._table.update(name, version, enabled, tags)

    async def names(self) -> list[str]:
        return self._table.names()

    async def close(self) -> None:
        return None
