"""Identity-provider tokens: verifying the `subject_token` of an RFC 8693 token exchange.

The IdP's signing keys come from its JWKS, cached per URI. An unknown `kid` triggers a refetch
(the IdP rotated) at most once per `min_refresh_s`; when the JWKS cannot be fetched the keys we
already hold are kept (stale-if-error), so an IdP outage does not become ours. One fetch per IdP is
in flight at a time, under one deadline for the whole document (an IdP that trickles its bytes
once held a token exchange 64 s); meanwhile requests the cached keys answer are answered from
them, and only those the fetch may answer (an unknown `kid`, nothing cached) wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt

from speechgate.core import jose
from speechgate.core.clients import IdentityProvider

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 256 * 1024
# The JWK key type each algorithm family needs: a key is only ever used with its own kind.
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


class SubjectTokenError(Exception):
    """The subject token is refused (invalid_grant); the reason is safe to show."""


class IdpUnavailable(Exception):
    """The IdP's keys could not be fetched and none are cached."""


@dataclass
class _KeySet:
    keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    fetched: float = float("-inf")  # last successful fetch
    attempted: float = float("-inf")  # last attempt, successful or not
    fetching: asyncio.Future[None] | None = None  # the fetch in flight


class JwksCache:
    def __init__(
        self,
        http: httpx.AsyncClient,
        min_refresh_s: float = 10.0,
        max_age_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        deadline_s: float = 5.0,
    ) -> None:
        self.http = http
        self.min_refresh_s = min_refresh_s
        self.max_age_s = max_age_s
        self.clock = clock
        self.deadline_s = deadline_s  # for one fetch, from its first byte asked to its last read
        self._sets: dict[str, _KeySet] = {}

    async def key(self, jwks_uri: str, kid: str | None) -> jwt.PyJWK | None:
        entry = self._sets.setdefault(jwks_uri, _KeySet())
        if entry.fetching is None and self._needs_fetch(entry, kid):
            entry.attempted = self.clock()
            fetching = entry.fetching = asyncio.ensure_future(self._fetch(jwks_uri, entry))
            fetching.add_done_callback(lambda done: _fetched(entry, done))
        if entry.fetching is not None and _lookup(entry, kid) is None:
            # Only the fetch may answer this one; its deadline bounds the wait. Shielded: the fetch
            # is everyone's, and one caller giving up must not end it for the others.
            await asyncio.shield(entry.fetching)
        if not entry.keys and entry.fetched == float("-inf"):
            raise IdpUnavailable(f"identity provider keys unavailable from {jwks_uri}")
        return _lookup(entry, kid)

    def expire(self, jwks_uri: str) -> None:
        """Fetch this JWKS at the next lookup, floor or not: its owner said it changed. What is
        cached stays in use should that fetch fail."""
        entry = self._sets.get(jwks_uri)
        if entry is not None:
            entry.fetched = entry.attempted = float("-inf")

    def _needs_fetch(self, entry: _KeySet, kid: str | None) -> bool:
        now = self.clock()
        if now - entry.attempted < self.min_refresh_s:
            return False  # the floor between fetches, whatever the reason
        return now - entry.fetched >= self.max_age_s or (kid is not None and kid not in entry.keys)

    async def _download(self, jwks_uri: str) -> bytes:
        """The JWKS document, read up to MAX_JWKS_BYTES and no further (a huge or endless body
        costs a few chunks, not memory)."""
        async with self.http.stream("GET", jwks_uri, timeout=5.0) as response:
            response.raise_for_status()
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS document too large")
        return bytes(body)

    async def _fetch(self, jwks_uri: str, entry: _KeySet) -> None:
        try:
            async with asyncio.timeout(self.deadline_s):
                body = await self._download(jwks_uri)
            keys = _parse_jwks(jose.loads_strict(body))
        except (httpx.HTTPError, ValueError, TimeoutError) as exc:
            log.warning(
                "JWKS fetch from %s failed (%s); keeping %d cached keys",
                jwks_uri,
                f"no answer within {self.deadline_s:g} s"
                if isinstance(exc, TimeoutError)
                else type(exc).__name__,
                len(entry.keys),
            )
            return
        entry.keys = keys
        entry.fetched = entry.attempted


def _fetched(entry: _KeySet, done: asyncio.Future[None]) -> None:
    if entry.fetching is done:
        entry.fetching = None


def _lookup(entry: _KeySet, kid: str | None) -> jwt.PyJWK | None:
    """The cached key for `kid`; without a kid, the set's only key."""
    if kid is None:
        return next(iter(entry.keys.values())) if len(entry.keys) == 1 else None
    return entry.keys.get(kid)


def _parse_jwks(doc: Any) -> dict[str, jwt.PyJWK]:
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str, jwt.PyJWK] = {}
    for item in doc["keys"]:
        if not isinstance(item, dict) or item.get("use", "sig") != "sig":
            continue
        if item.get("kty") == "oct":
            continue  # a symmetric key in a public document is never trusted
        try:
            key = jwt.PyJWK(item)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue  # skip keys we cannot use, keep the others
        keys[str(item.get("kid", ""))] = key
    return keys


# The `typ` of tokens that name a signed-in user: ID tokens (JWT, or none) and RFC 9068 access tokens.
SUBJECT_TOKEN_TYPS = frozenset({"jwt", "application/jwt", "at+jwt", "application/at+jwt"})


async def verify_subject_token(
    token: str,
    idp: IdentityProvider,
    cache: JwksCache,
    *,
    our_issuer: str,
    leeway: int = 30,
) -> str:
    """Verify an IdP token and return its subject. Raises SubjectTokenError or IdpUnavailable."""
    try:
        header, payload = jose.split(token)
    except jose.MalformedToken as exc:
        raise SubjectTokenError(f"subject_token is malformed: {exc}") from None
    typ = header.get("typ")
    if typ is not None and str(typ).lower() not in SUBJECT_TOKEN_TYPS:
        # A DPoP proof, a logout token, a security event… is signed by the IdP but says nothing
        # about who is signed in (RFC 8725 §3.11: explicit typing, checked).
        raise SubjectTokenError(f"subject_token typ {str(typ)[:30]!r} is not an ID or access token")
    alg = header.get("alg")
    if alg not in idp.algorithms:
        raise SubjectTokenError(f"subject_token algorithm {alg!r} is not allowed for this client")
    # RFC 8725 §3.12: our own access tokens are never accepted as identity.
    if payload.get("iss") == our_issuer:
        raise SubjectTokenError("subject_token must come from the identity provider, not from us")
    kid = header.get("kid")
    key = await cache.key(idp.jwks_uri, kid if isinstance(kid, str) else None)
    if key is None:
        raise SubjectTokenError("subject_token is signed with a key the identity provider does not publish")
    if key.key_type != _KEY_TYPES[alg[:2]]:
        raise SubjectTokenError(f"subject_token algorithm {alg} does not fit the {key.key_type} key it names")
    try:
        # The key object (not the PyJWK) so the algorithm family must match the key type.
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[alg],
            audience=idp.audience,
            issuer=idp.issuer,
            leeway=leeway,
            options={"require": ["iss", "aud", "exp", "sub"]},
        )
    except jwt.InvalidTokenError as exc:
        raise SubjectTokenError(f"subject_token {jose.failure(exc)}") from None
    except (jwt.InvalidKeyError, TypeError, ValueError):
        raise SubjectTokenError("subject_token has an invalid signature") from None
    subject = claims["sub"]
    if not isinstance(subject, str) or not 0 < len(subject) <= 256 or not subject.isprintable():
        # Control characters would reach logs, Redis keys and the SRE's terminal.
        raise SubjectTokenError("subject_token 'sub' must be 1-256 printable characters")
    return subject
