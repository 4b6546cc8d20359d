"""Clients: who may ask for tokens, with what limits, and how they prove who they are.

A client's policy is a JSON document stored as the secret `speechgate-client-<id>`. Confidential
clients (app backends) hold a random 256-bit secret of which only a keyed hash is stored: the
secret has full entropy, so a fast HMAC is as safe as a slow password hash and keeps the token
endpoint fast. Public clients (mobile apps) hold no secret and may only exchange an
identity-provider token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import limits

from speechgate.core.claims import SCOPES
from speechgate.core.store import SecretDisabled, SecretNotFound, SecretStore, StoreError
from speechgate.core.upstreams import ZONE

CLIENT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{2,63}$")
HASH_KEY_SECRET = "speechgate-secret-hash-key"  # noqa: S105 - a secret name
# Asymmetric algorithms only: an HMAC "key" taken from a public JWKS would let anyone sign.
IDP_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
LOCALE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$")


class PolicyError(ValueError):
    """A client policy document is invalid; the message names the field."""


def check_client_id(client_id: str) -> None:
    """Before the id names anything in the store (whose names are narrower than any text)."""
    if not CLIENT_ID.match(client_id):
        raise PolicyError("client_id must be 3-64 lowercase letters, digits or '-'")


def secret_name(client_id: str) -> str:
    return f"speechgate-client-{client_id}"


@dataclass(frozen=True)
class IdentityProvider:
    """Where a public client's users sign in: their tokens are exchanged for ours."""

    issuer: str
    jwks_uri: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256", "ES256")


@dataclass(frozen=True)
class RateLimits:
    """`limits` strings such as "20/minute;300/hour"; empty means no limit of that kind."""

    client: str = "600/minute"
    subject: str = "20/minute;300/hour"
    ip: str = "120/minute"


@dataclass(frozen=True)
class ClientPolicy:
    client_id: str
    name: str = ""
    secret_hash: str | None = None
    scopes: tuple[str, ...] = SCOPES
    languages: tuple[str, ...] = ("*",)
    token_ttl_s: int = 300
    max_session_s: int = 3600
    rate_limits: RateLimits = field(default_factory=RateLimits)
    max_streams_per_client: int = 100
    max_streams_per_subject: int = 2
    audio_s_per_day_client: int = 360_000
    audio_s_per_day_subject: int = 3_600
    idp: IdentityProvider | None = None
    enabled: bool = True
    # What costs extra or keeps data, allowed by name ("*": any): Custom Speech models (`cid`),
    # custom voices (`deploymentId`), and whether Azure may store the audio (`storeAudio`).
    custom_models: tuple[str, ...] = ()
    custom_voices: tuple[str, ...] = ()
    store_audio: bool = False
    max_translation_targets: int = 2  # each target language is billed as translation
    # Web origins whose pages may open streams (`https://app.example`); empty: any. Browsers
    # send Origin, native SDKs do not, so this holds for browsers only.
    origins: tuple[str, ...] = ()
    # Data-residency zones of the upstream pool its streams may use ("eu"); empty: any upstream.
    zones: tuple[str, ...] = ()

    @property
    def public(self) -> bool:
        return self.secret_hash is None

    def allows_language(self, locale: str) -> bool:
        return "*" in self.languages or locale.lower() in {x.lower() for x in self.languages}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, raw: str) -> ClientPolicy:
        try:
            doc = json.loads(raw)
        except ValueError:
            raise PolicyError("client policy is not valid JSON") from None
        if not isinstance(doc, dict):
            raise PolicyError("client policy must be a JSON object")
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ClientPolicy:
        known = set(cls.__dataclass_fields__)
        unknown = set(doc) - known
        if unknown:
            raise PolicyError(f"unknown policy fields: {', '.join(sorted(unknown))}")
        values = dict(doc)
        if "rate_limits" in values:
            values["rate_limits"] = _rate_limits(values["rate_limits"])
        if values.get("idp") is not None:
            values["idp"] = _idp(values["idp"])
        for name in ("scopes", "languages", "custom_models", "custom_voices", "origins", "zones"):
            if name in values:
                values[name] = tuple(_strings(values[name], name))
        try:
            policy = cls(**values)
        except TypeError as exc:
            raise PolicyError(str(exc)) from None
        policy.validate()
        return policy

    def validate(self) -> None:
        check_client_id(self.client_id)
        bad = set(self.scopes) - set(SCOPES)
        if bad or not self.scopes:
            raise PolicyError(f"scopes must be a non-empty subset of {' '.join(SCOPES)}")
        for locale in self.languages:
            if locale != "*" and not LOCALE.match(locale):
                raise PolicyError(f"language {locale!r} is not a locale such as en-US")
        for name in (
            "token_ttl_s",
            "max_session_s",
            "max_streams_per_client",
            "max_streams_per_subject",
            "audio_s_per_day_client",
            "audio_s_per_day_subject",
            "max_translation_targets",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PolicyError(f"{name} must be a non-negative integer")
        if not 10 <= self.token_ttl_s <= 3600:
            raise PolicyError("token_ttl_s must be between 10 and 3600 seconds")
        if self.max_session_s < 1:
            raise PolicyError("max_session_s must be at least 1 second (how long one stream may last)")
        for kind, text in asdict(self.rate_limits).items():
            _check_rate_limit(kind, text)
        for origin in self.origins:
            parts = urlsplit(origin)
            if (
                parts.scheme not in ("https", "http")
                or not parts.hostname
                or parts.path
                or origin.endswith("/")
            ):
                raise PolicyError(f"origin {origin!r} is not like https://app.example (scheme, host, port)")
        for zone in self.zones:
            if not ZONE.match(zone):
                raise PolicyError(f"zone {zone!r} is not a zone name such as eu (lowercase, digits, dashes)")
        if not isinstance(self.store_audio, bool):
            raise PolicyError("store_audio must be true or false")
        if self.public and self.idp is None:
            raise PolicyError("a public client (no secret) needs an identity provider (idp)")


def _strings(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise PolicyError(f"{name} must be a list of strings")
    return value


def _rate_limits(value: Any) -> RateLimits:
    if not isinstance(value, dict):
        raise PolicyError("rate_limits must be an object with client, subject and ip")
    try:
        limits_ = RateLimits(**value)
    except TypeError:
        raise PolicyError("rate_limits may only have client, subject and ip") from None
    for kind, text in asdict(limits_).items():
        _check_rate_limit(kind, text)
    return limits_


def _check_rate_limit(kind: str, text: Any) -> None:
    """One of a policy's rate limits, in `limits` notation; empty means none of that kind."""
    if not isinstance(text, str):
        raise PolicyError(f"rate_limits.{kind} must be a string such as '20/minute'")
    try:
        if text:
            limits.parse_many(text)
    except ValueError:
        raise PolicyError(
            f"rate_limits.{kind} {text!r} is not like '20/minute;300/hour' (empty: no limit)"
        ) from None


def _https_or_loopback(url: str) -> bool:
    """Keys that decide who a user is come over TLS; plain HTTP only from this machine."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def _idp(value: Any) -> IdentityProvider:
    if not isinstance(value, dict):
        raise PolicyError("idp must be an object with issuer, jwks_uri and audience")
    try:
        idp = IdentityProvider(**{**value, "algorithms": tuple(value.get("algorithms", ("RS256", "ES256")))})
    except TypeError:
        raise PolicyError("idp needs issuer, jwks_uri, audience and optionally algorithms") from None
    if not all(isinstance(x, str) and x for x in (idp.issuer, idp.jwks_uri, idp.audience)):
        raise PolicyError("idp issuer, jwks_uri and audience must be non-empty strings")
    if not _https_or_loopback(idp.jwks_uri):
        raise PolicyError("idp.jwks_uri must be an https:// URL (http:// only on loopback, for development)")
    bad = set(idp.algorithms) - IDP_ALGORITHMS
    if bad or not idp.algorithms:
        raise PolicyError(f"idp.algorithms must be asymmetric JWS algorithms, not {sorted(bad)}")
    return idp


# --- secrets --------------------------------------------------------------------------------


def new_client_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(hash_key: bytes, client_id: str, secret: str) -> str:
    """Keyed hash bound to the client id, so a stored hash cannot be moved to another client."""
    mac = hmac.new(hash_key, f"{client_id}:{secret}".encode(), hashlib.sha256)
    return "hmac-sha256:" + mac.hexdigest()


def check_secret(hash_key: bytes, policy: ClientPolicy, secret: str) -> bool:
    if policy.secret_hash is None:
        return False
    return hmac.compare_digest(hash_secret(hash_key, policy.client_id, secret), policy.secret_hash)


async def ensure_hash_key(store: SecretStore) -> bytes:
    """The key of the secret hashes, created once on first use; it is never rotated."""
    try:
        value = (await store.get(HASH_KEY_SECRET)).value
    except SecretNotFound:
        value = (await store.set(HASH_KEY_SECRET, secrets.token_hex(32))).value
    assert value is not None
    return bytes.fromhex(value)


async def save_client(store: SecretStore, policy: ClientPolicy) -> None:
    policy.validate()
    await store.set(
        secret_name(policy.client_id),
        policy.to_json(),
        tags={"kind": "client"},
        content_type="application/json",
    )


CLIENT_PREFIX = "speechgate-client-"


async def load_client(store: SecretStore, client_id: str) -> ClientPolicy:
    """A client's policy straight from the store (the CLI's view); SecretNotFound if none."""
    if not CLIENT_ID.match(client_id):
        raise SecretNotFound(f"no client {client_id!r}: ids are 3-64 lowercase letters, digits or '-'")
    try:
        secret = await store.get(secret_name(client_id))
    except SecretNotFound:
        raise SecretNotFound(f"no client {client_id!r} (`speechgate clients list` shows them)") from None
    assert secret.value is not None
    try:
        return ClientPolicy.from_json(secret.value)
    except PolicyError as exc:
        raise StoreError(f"the stored policy of client {client_id!r} is invalid: {exc}") from None


async def all_clients(store: SecretStore) -> list[ClientPolicy]:
    found = []
    for name in await store.names():
        if name.startswith(CLIENT_PREFIX):
            try:
                found.append(await load_client(store, name.removeprefix(CLIENT_PREFIX)))
            except SecretDisabled:
                continue
    return found


async def longest_token_use_s(store: SecretStore) -> int:
    """How long any token may still be used after it is issued: its lifetime, then a session."""
    spans = [c.token_ttl_s + c.max_session_s for c in await all_clients(store)]
    default = ClientPolicy(client_id="default", secret_hash="")
    return max(spans, default=default.token_ttl_s + default.max_session_s)


# --- the registry: cached policies ----------------------------------------------------------

DISABLED = "disabled"


@dataclass
class _Entry:
    policy: ClientPolicy | str | None  # a policy, DISABLED, or None for "no such client"
    fetched: float


class ClientRegistry:
    """Client policies read through the store and kept in memory.

    A cached policy is served for `ttl` seconds, then read again; when the store cannot be read,
    the policy already held keeps being served, so a store outage never stops a running service.
    Unknown ids are remembered for a shorter time so that they cannot make us hammer the store.
    """

    def __init__(
        self,
        store: SecretStore,
        ttl: float = 30.0,
        negative_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.clock = clock
        self._cache: dict[str, _Entry] = {}

    async def get(self, client_id: str) -> ClientPolicy | str | None:
        """The client's policy, DISABLED, or None when there is no such client."""
        if not CLIENT_ID.match(client_id):
            return None
        now = self.clock()
        entry = self._cache.get(client_id)
        if entry is not None:
            ttl = self.ttl if entry.policy is not None else self.negative_ttl
            if now - entry.fetched < ttl:
                return entry.policy
        try:
            found = await self._read(client_id)
        except StoreError:
            if entry is None:
                raise
            entry.fetched = now  # keep serving what we have; try again after another ttl
            return entry.policy
        if len(self._cache) > 10_000:
            self._cache.clear()  # bounded: a flood of made-up ids cannot grow memory
        self._cache[client_id] = _Entry(found, now)
        return found

    def clear(self) -> None:
        """Forget every cached policy: read each again on its next use."""
        self._cache.clear()

    async def _read(self, client_id: str) -> ClientPolicy | str | None:
        try:
            secret = await self.store.get(secret_name(client_id))
        except SecretNotFound:
            return None
        except SecretDisabled:
            return DISABLED
        assert secret.value is not None
        try:
            return ClientPolicy.from_json(secret.value)
        except PolicyError as exc:
            raise StoreError(f"policy of client {client_id!r} is invalid: {exc}") from None
