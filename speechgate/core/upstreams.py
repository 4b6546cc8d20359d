"""The upstream pool: the Azure Speech resources behind the relays, their limits and labels.

The pool is one JSON document, the store's `speechgate-upstreams` (Key Vault in production, the
file store in development), edited with `speechgate upstreams …`, which tells every relay to load
it again. Each resource's key is a secret of its own, `speechgate-upstream-<name>-key`, rotated as
the single key is (core/speechkeys.py: two slots, the one not in use regenerated); or a resource
is reached keyless with Entra ID (`resource_id`).

An entry with neither region nor endpoint is the relay's own configured upstream (SPEECH_REGION
or SPEECHGATE_SPEECH_ENDPOINT, with its key or identity): that is how the resource a relay used
before the pool joins it. An empty pool is that configured upstream alone, without a limit: a
relay configured as before the pool works as before, with no routing and no extra Redis call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from speechgate.core.store import SecretNotFound, SecretStore, StoreError

POOL_SECRET = "speechgate-upstreams"  # noqa: S105 - a secret name
NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
STATES = ("active", "draining", "disabled")  # only active upstreams get new streams
SERVICES = ("stt", "tts", "s2s")  # recognition, synthesis, translation (relay.endpoints)
AUTHS = ("key", "entra")
ZONE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
REGION = re.compile(r"^[a-z0-9]{2,40}$")


class PoolError(ValueError):
    """An upstream definition is invalid; the message names the field and what to give."""


def key_secret(name: str) -> str:
    """The secret holding an upstream's Azure Speech key."""
    return f"speechgate-upstream-{name}-key"


@dataclass(frozen=True)
class Upstream:
    name: str
    limit: int  # concurrent streams Azure allows this resource (standard tier: 100 by default)
    region: str | None = None
    endpoint: str | None = None  # wss://… (a custom domain, a sovereign cloud, a local fake)
    auth: str = "key"  # "key": key_secret(name); "entra": keyless, with resource_id
    resource_id: str | None = None
    zone: str | None = None  # data-residency zone ("eu"): clients restricted to zones stay in them
    labels: Mapping[str, str] = field(default_factory=dict)
    services: tuple[str, ...] = ()  # what it serves (stt, tts, s2s); empty: all
    languages: tuple[str, ...] = ()  # locales it serves; empty: any
    state: str = "active"

    @property
    def configured(self) -> bool:
        """The relay's own configured upstream (settings), not a resource of the pool's own."""
        return self.region is None and self.endpoint is None

    @property
    def owns_key(self) -> bool:
        """Whether it has a key of its own, the secret key_secret(name) (else Entra ID, or the
        relays' configured credentials)."""
        return self.auth == "key" and not self.configured

    def serves(self, service: str, language: str | None) -> bool:
        if self.services and service not in self.services:
            return False
        if language is None or not self.languages:
            return True
        return language.lower() in {x.lower() for x in self.languages}

    def base_url(self, service: str) -> str:
        if self.endpoint:
            return self.endpoint.rstrip("/")
        return f"wss://{self.region}.{service}.speech.microsoft.com"

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["labels"] = dict(self.labels)
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Upstream:
        unknown = set(doc) - set(cls.__dataclass_fields__)
        if unknown:
            raise PoolError(f"unknown upstream fields: {', '.join(sorted(unknown))}")
        values = dict(doc)
        for name in ("services", "languages"):
            if name in values:
                values[name] = tuple(values[name])
        try:
            upstream = cls(**values)
        except TypeError as exc:
            raise PoolError(f"invalid upstream: {exc}") from None
        upstream.check()
        return upstream

    def check(self) -> None:
        """Every field valid, or a PoolError saying which and what to give."""
        if not isinstance(self.name, str) or not NAME.match(self.name):
            raise PoolError("an upstream's name is 1-32 lowercase letters, digits and dashes")
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or not 1 <= self.limit <= 100_000:
            raise PoolError(f"{self.name}: the limit is the concurrent streams Azure allows, 1-100000")
        if self.region is not None and self.endpoint is not None:
            raise PoolError(f"{self.name}: give a region or an endpoint, not both")
        if self.region is not None and not REGION.match(self.region):
            raise PoolError(f"{self.name}: the region is Azure's name for it, e.g. westeurope")
        if self.endpoint is not None and not self.endpoint.startswith(("wss://", "ws://")):
            raise PoolError(f"{self.name}: the endpoint must be a wss:// URL")
        if self.auth not in AUTHS:
            raise PoolError(f"{self.name}: auth is key or entra")
        if self.auth == "entra" and not self.resource_id and not self.configured:
            raise PoolError(f"{self.name}: keyless (entra) needs the Speech resource's id")
        if self.zone is not None and not ZONE.match(self.zone):
            raise PoolError(f"{self.name}: a zone is 1-32 lowercase letters, digits and dashes, e.g. eu")
        if any(s not in SERVICES for s in self.services):
            raise PoolError(f"{self.name}: services are {', '.join(SERVICES)}")
        if self.state not in STATES:
            raise PoolError(f"{self.name}: the state is one of {', '.join(STATES)}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.labels.items()):
            raise PoolError(f"{self.name}: labels are text names and values")


def pool_from_json(raw: str) -> list[Upstream]:
    try:
        doc = json.loads(raw)
    except ValueError:
        raise PoolError("the upstream pool is not valid JSON") from None
    if not isinstance(doc, list) or not all(isinstance(item, dict) for item in doc):
        raise PoolError("the upstream pool must be a JSON list of upstreams")
    pool = [Upstream.from_dict(item) for item in doc]
    check_pool(pool)
    return pool


def check_pool(pool: Iterable[Upstream]) -> None:
    seen: set[str] = set()
    configured = 0
    for upstream in pool:
        if upstream.name in seen:
            raise PoolError(f"two upstreams are named {upstream.name}")
        seen.add(upstream.name)
        configured += upstream.configured
    if configured > 1:
        raise PoolError("only one upstream may be the relay's configured one (no region, no endpoint)")


async def load_pool(store: SecretStore) -> list[Upstream]:
    """The pool as stored; empty when there is none. StoreError when the store cannot be read."""
    try:
        secret = await store.get(POOL_SECRET)
    except SecretNotFound:
        return []
    return pool_from_json(secret.value or "[]")


async def save_pool(store: SecretStore, pool: list[Upstream], changed_by: str) -> None:
    check_pool(pool)
    body = json.dumps([u.to_dict() for u in pool], indent=1)
    await store.set(POOL_SECRET, body, tags={"changed-by": changed_by}, content_type="application/json")


def with_state(pool: list[Upstream], name: str, state: str) -> list[Upstream]:
    return [replace(u, state=state) if u.name == name else u for u in pool]


def find(pool: Iterable[Upstream], name: str) -> Upstream:
    for upstream in pool:
        if upstream.name == name:
            return upstream
    raise StoreError(f"no upstream named {name}: `speechgate upstreams list` shows them")
