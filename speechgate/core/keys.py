"""Signing keys: ES256 key pairs kept as versions of one secret, and the JWKS built from them.

Every enabled version is published in the JWKS, so that tokens signed before a rotation keep
verifying until they expire. Of the versions whose `signs-from` time has come, the latest signs:
a rotation publishes the next key first and lets it sign only once every replica serves it (a
relay that fetched the JWKS from a replica that had not reloaded yet would refuse its tokens until
its next fetch). Retiring a key means disabling its version in the store; revoking one (it
leaked) disables it without waiting for its tokens to expire, and the relays refuse its kid from
then on (speechgate/core/revocation.py).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from speechgate.core.store import SecretNotFound, SecretStore, SecretVersion, StoreError

log = logging.getLogger(__name__)

SIGNING_KEY_SECRET = "speechgate-signing-key"  # noqa: S105 - a secret name
ALGORITHM = "ES256"
T = TypeVar("T")


class SigningKeyError(StoreError):
    """The signing keys in the store cannot be used; the message says which and why."""


class NoSigningKey(SigningKeyError):
    """The store holds no enabled signing key yet."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The bare RFC 7517 JWK members of a P-256 public key."""
    numbers = public_key.public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 thumbprint: SHA-256 of the required members, sorted, without whitespace."""
    required = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def generate_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey
    version: str
    created: int
    signs_from: int = 0  # epoch seconds: published before, signing from then on

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    @functools.cached_property
    def header_segment(self) -> str:
        """The encoded JOSE header of every token this key signs."""
        header = {"alg": ALGORITHM, "kid": self.kid, "typ": "at+jwt"}
        return b64url(json.dumps(header, separators=(",", ":")).encode())

    def jwk(self) -> dict[str, str]:
        return {**public_jwk(self.public_key), "kid": self.kid, "use": "sig", "alg": ALGORITHM}


def load_signing_key(secret: SecretVersion) -> SigningKey:
    """Parse one stored version; refuse anything but an unencrypted P-256 private key."""
    assert secret.value is not None
    try:
        key = serialization.load_pem_private_key(secret.value.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise SigningKeyError(f"signing key version {secret.version} is not a valid PEM key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise SigningKeyError(f"signing key version {secret.version} is not a P-256 (ES256) key")
    kid = thumbprint(public_jwk(key.public_key()))
    return SigningKey(kid, key, secret.version, secret.created, _signs_from(secret))


def _signs_from(item: SecretVersion) -> int:
    """When the version signs from: its tag, else (stored by other means) its creation."""
    try:
        return int(item.tags["signs-from"])
    except (KeyError, ValueError):
        return item.created


def signing_now(versions: list[SecretVersion], now: float) -> SecretVersion:
    """The version that signs at `now` (oldest first given)."""
    return _due(versions, _signs_from, now)


def _due(items: list[T], signs_from: Callable[[T], int], now: float) -> T:
    """Of the items whose time has come, the one that came last: the newest of equals, since
    versions made in one second may list in any order on Key Vault. The newest if none has."""
    due = [item for item in items if signs_from(item) <= now]
    return max(reversed(due), key=signs_from) if due else items[-1]


@dataclass(frozen=True)
class KeyRing:
    """Every key a token may be verified with, as loaded at one moment; the one signing then, and
    the published one that takes over at its `signs_from`, if any."""

    signer: SigningKey
    keys: dict[str, SigningKey]
    jwks_json: bytes
    upcoming: SigningKey | None = None

    @classmethod
    def of(cls, keys: list[SigningKey], now: float | None = None) -> KeyRing:
        """`keys` oldest first; the newest whose time has come signs."""
        if not keys:
            raise NoSigningKey("no enabled signing key in the store; run `speechgate keys rotate-signing`")
        now = time.time() if now is None else now
        signer = _due(keys, lambda k: k.signs_from, now)
        jwks = {"keys": [k.jwk() for k in reversed(keys)]}
        return cls(
            signer=signer,
            keys={k.kid: k for k in keys},
            jwks_json=json.dumps(jwks, separators=(",", ":")).encode(),
            upcoming=min((k for k in keys if k.signs_from > now), key=lambda k: k.signs_from, default=None),
        )

    def signer_at(self, now: float) -> SigningKey:
        """The key that signs at `now`: the upcoming one once its time has come."""
        upcoming = self.upcoming
        return upcoming if upcoming is not None and now >= upcoming.signs_from else self.signer

    def public_keys(self) -> dict[str, Any]:
        return {kid: k.public_key for kid, k in self.keys.items()}


async def load_keyring(store: SecretStore, now: float | None = None) -> KeyRing:
    """Every enabled key. The one signing now must be valid; any other damaged one is left out
    with an error in the log, so it can never stop a service that has a good signer."""
    now = time.time() if now is None else now
    try:
        versions = [v for v in await store.versions(SIGNING_KEY_SECRET) if v.enabled]
    except SecretNotFound:
        versions = []
    keys = []
    for item in versions:
        try:
            keys.append(load_signing_key(await store.get(SIGNING_KEY_SECRET, item.version)))
        except SigningKeyError as exc:
            if item is signing_now(versions, now):
                raise SigningKeyError(f"{exc}; run `speechgate keys rotate-signing` to replace it") from None
            log.error("%s; left out of the JWKS", exc)
    return KeyRing.of(keys, now)


async def add_signing_key(store: SecretStore, signs_from: int = 0) -> SigningKey:
    """Store a new key pair as the newest version: published on the next load, signing from
    `signs_from` (at once by default)."""
    pem = generate_pem()
    kid = load_signing_key(_unsaved(pem)).kid
    tags = {"kid": kid, "state": "active", "created-at": str(int(time.time()))}
    if signs_from:
        tags["signs-from"] = str(signs_from)
    stored = await store.set(SIGNING_KEY_SECRET, pem, tags=tags, content_type="application/x-pem-file")
    return load_signing_key(stored)


async def ensure_signing_key(store: SecretStore) -> KeyRing:
    """The key ring, creating a first signing key when the store has none (first start)."""
    try:
        return await load_keyring(store)
    except NoSigningKey:
        await add_signing_key(store)
        return await load_keyring(store)


async def _usable(store: SecretStore, item: SecretVersion) -> bool:
    try:
        load_signing_key(await store.get(SIGNING_KEY_SECRET, item.version))
    except SigningKeyError:
        return False
    return True


def _unsaved(pem: str) -> SecretVersion:
    return SecretVersion(name=SIGNING_KEY_SECRET, version="new", value=pem)


# --- rotation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rotation:
    signer_kid: str
    created: bool  # False when this run only finished an interrupted one
    previous_kids: list[str]
    retired_kids: list[str]
    signs_from: int  # when the new key takes over; the previous ones sign until then


async def prune_signing_keys(store: SecretStore, now: int | None = None) -> list[str]:
    """Disable the versions whose tokens have all expired (`retire-after` passed); their kids."""
    now = int(time.time()) if now is None else now
    try:
        versions = await store.versions(SIGNING_KEY_SECRET)
    except SecretNotFound:
        return []
    enabled = [v for v in versions if v.enabled]
    retired = []
    for item in enabled[:-1]:  # never the signer
        if item.tags.get("state") == "previous" and int(item.tags.get("retire-after", "0")) <= now:
            await store.update(
                SIGNING_KEY_SECRET, item.version, enabled=False, tags={**item.tags, "state": "retired"}
            )
            retired.append(item.tags.get("kid", item.version))
    return retired


async def rotate_signing_key(
    store: SecretStore, grace_s: int, publish_s: int, now: int | None = None
) -> Rotation:
    """Publish a new key that signs `publish_s` seconds from now; the previous ones sign until
    then and stay published for `grace_s` more seconds.

    Steps, each safe to repeat: (1) store the new key with its `signs-from`; (2) mark every older
    active key `previous` with `retire-after`. A run interrupted after (1) leaves an older key
    still marked `active`: the next run sees that, does (2) and creates no other key, so there is
    never more than one new signer. When the key signing now is damaged, the new one signs at once.
    """
    now = int(time.time()) if now is None else now
    retired = await prune_signing_keys(store, now)
    try:
        versions = [v for v in await store.versions(SIGNING_KEY_SECRET) if v.enabled]
    except SecretNotFound:
        versions = []
    unfinished = (
        len(versions) > 1
        and any(v.tags.get("state") == "active" for v in versions[:-1])
        and await _usable(store, versions[-1])  # a damaged newest version is replaced, not kept
    )
    if unfinished:
        signer_kid = versions[-1].tags.get("kid", "")
        signs_from = _signs_from(versions[-1])
        older = versions[:-1]
    else:
        if not versions or not await _usable(store, signing_now(versions, now)):
            publish_s = 0  # nothing else can sign meanwhile
        signs_from = now + publish_s
        signer_kid = (await add_signing_key(store, signs_from)).kid
        older = versions
    previous = []
    for item in older:
        if item.tags.get("state") == "active":
            await store.update(
                SIGNING_KEY_SECRET,
                item.version,
                tags={**item.tags, "state": "previous", "retire-after": str(signs_from + grace_s)},
            )
            previous.append(item.tags.get("kid", item.version))
    return Rotation(signer_kid, not unfinished, previous, retired, signs_from)


# --- revocation (a leaked key) --------------------------------------------------------------


@dataclass(frozen=True)
class KeyRevocation:
    kid: str
    version: str
    new_signer_kid: str | None  # set when the revoked key was the signer
    was_enabled: bool  # False when an earlier, interrupted run had disabled it already


async def _sign_now(store: SecretStore, upcoming: list[SecretVersion], now: int) -> str:
    """A signer from `now` on: the published key a rotation had scheduled, brought forward (relays
    may know it already), else a new one. Its kid."""
    for item in reversed(upcoming):
        if await _usable(store, item):
            await store.update(SIGNING_KEY_SECRET, item.version, tags={**item.tags, "signs-from": str(now)})
            return str(await _kid_of(store, item))
    return (await add_signing_key(store, now)).kid


async def _kid_of(store: SecretStore, item: SecretVersion) -> str | None:
    if "kid" in item.tags:
        return item.tags["kid"]
    try:  # a version stored by other means than ours carries no tag
        return load_signing_key(await store.get(SIGNING_KEY_SECRET, item.version)).kid
    except SigningKeyError:
        return None


async def revoke_signing_key(store: SecretStore, kid: str, by: str, now: int | None = None) -> KeyRevocation:
    """Disable the version with this kid at once, grace or not; when it was the signer, another
    signs first (a scheduled one brought forward, or a new one). Safe to repeat: a run that finds
    it disabled already changes nothing."""
    now = int(time.time()) if now is None else now
    try:
        versions = await store.versions(SIGNING_KEY_SECRET)
    except SecretNotFound:
        versions = []
    matching = [v for v in versions if await _kid_of(store, v) == kid]
    if not matching:
        raise SecretNotFound(f"no signing key has kid {kid!r}; `speechgate keys list` shows the kids")
    target = matching[-1]
    new_signer = None
    enabled = [v for v in versions if v.enabled]
    if target.enabled:
        if signing_now(enabled, now).version == target.version:
            new_signer = await _sign_now(store, [v for v in enabled if _signs_from(v) > now], now)
        await store.update(
            SIGNING_KEY_SECRET,
            target.version,
            enabled=False,
            tags={**target.tags, "kid": kid, "state": "revoked", "revoked-at": str(now), "revoked-by": by},
        )
    return KeyRevocation(kid, target.version, new_signer, target.enabled)
