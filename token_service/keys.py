"""Signing keys: ES256 key pairs kept as versions of one secret, and the JWKS built from them.

The newest enabled version signs; every enabled version is published in the JWKS so that tokens
signed before a rotation keep verifying until they expire. Retiring a key means disabling its
version in the store; revoking one (it leaked) disables it without waiting for its tokens to
expire, and the relays refuse its kid from then on (token_service/revocation.py).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from token_service.store import SecretNotFound, SecretStore, SecretVersion, StoreError

log = logging.getLogger(__name__)

SIGNING_KEY_SECRET = "speechgate-signing-key"  # noqa: S105 - a secret name
ALGORITHM = "ES256"


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
    return SigningKey(kid=kid, private_key=key, version=secret.version, created=secret.created)


@dataclass(frozen=True)
class KeyRing:
    """The signer and every key a token may be verified with, as loaded at one moment."""

    signer: SigningKey
    keys: dict[str, SigningKey]
    jwks_json: bytes

    @classmethod
    def of(cls, keys: list[SigningKey]) -> KeyRing:
        """`keys` oldest first; the newest signs."""
        if not keys:
            raise NoSigningKey("no enabled signing key in the store; run `speechgate keys rotate-signing`")
        jwks = {"keys": [k.jwk() for k in reversed(keys)]}
        return cls(
            signer=keys[-1],
            keys={k.kid: k for k in keys},
            jwks_json=json.dumps(jwks, separators=(",", ":")).encode(),
        )

    def public_keys(self) -> dict[str, Any]:
        return {kid: k.public_key for kid, k in self.keys.items()}


async def load_keyring(store: SecretStore) -> KeyRing:
    """Every enabled key. The newest must be valid (it signs); a damaged older one is left out
    with an error in the log, so it can never stop a service that has a good signer."""
    try:
        versions = [v for v in await store.versions(SIGNING_KEY_SECRET) if v.enabled]
    except SecretNotFound:
        versions = []
    keys = []
    for item in versions:
        try:
            keys.append(load_signing_key(await store.get(SIGNING_KEY_SECRET, item.version)))
        except SigningKeyError as exc:
            if item is versions[-1]:
                raise SigningKeyError(f"{exc}; run `speechgate keys rotate-signing` to replace it") from None
            log.error("%s; left out of the JWKS", exc)
    return KeyRing.of(keys)


async def add_signing_key(store: SecretStore) -> SigningKey:
    """Store a new key pair as the newest version: it becomes the signer on the next load."""
    pem = generate_pem()
    kid = load_signing_key(_unsaved(pem)).kid
    stored = await store.set(
        SIGNING_KEY_SECRET,
        pem,
        tags={"kid": kid, "state": "active", "created-at": str(int(time.time()))},
        content_type="application/x-pem-file",
    )
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


async def rotate_signing_key(store: SecretStore, grace_s: int, now: int | None = None) -> Rotation:
    """Make a new key the signer; keep the previous ones published for `grace_s` more seconds.

    Steps, each safe to repeat: (1) store the new key, which signs from then on (the newest
    enabled version signs); (2) mark every older active key `previous` with `retire-after`.
    A run interrupted after (1) leaves an older key still marked `active`: the next run sees
    that, does (2) and creates no other key, so there is never more than one new signer.
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
        older = versions[:-1]
    else:
        signer_kid = (await add_signing_key(store)).kid
        older = versions
    previous = []
    for item in older:
        if item.tags.get("state") == "active":
            await store.update(
                SIGNING_KEY_SECRET,
                item.version,
                tags={**item.tags, "state": "previous", "retire-after": str(now + grace_s)},
            )
            previous.append(item.tags.get("kid", item.version))
    return Rotation(signer_kid, not unfinished, previous, retired)


# --- revocation (a leaked key) --------------------------------------------------------------


@dataclass(frozen=True)
class KeyRevocation:
    kid: str
    version: str
    new_signer_kid: str | None  # set when the revoked key was the signer
    was_enabled: bool  # False when an earlier, interrupted run had disabled it already


async def _kid_of(store: SecretStore, item: SecretVersion) -> str | None:
    if "kid" in item.tags:
        return item.tags["kid"]
    try:  # a version stored by other means than ours carries no tag
        return load_signing_key(await store.get(SIGNING_KEY_SECRET, item.version)).kid
    except SigningKeyError:
        return None


async def revoke_signing_key(store: SecretStore, kid: str, by: str, now: int | None = None) -> KeyRevocation:
    """Disable the version with this kid at once, grace or not; a new key signs first when it was
    the signer. Safe to repeat: a run that finds it disabled already changes nothing."""
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
    if target.enabled:
        if [v for v in versions if v.enabled][-1].version == target.version:
            new_signer = (await add_signing_key(store)).kid
        await store.update(
            SIGNING_KEY_SECRET,
            target.version,
            enabled=False,
            tags={**target.tags, "kid": kid, "state": "revoked", "revoked-at": str(now), "revoked-by": by},
        )
    return KeyRevocation(kid, target.version, new_signer, target.enabled)
