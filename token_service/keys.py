"""Signing keys: ES256 key pairs kept as versions of one secret, and the JWKS built from them.

The newest enabled version signs; every enabled version is published in the JWKS so that tokens
signed before a rotation keep verifying until they expire. Retiring a key means disabling its
version in the store.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from token_service.store import SecretNotFound, SecretStore, SecretVersion, StoreError

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
    try:
        versions = await store.versions(SIGNING_KEY_SECRET)
    except SecretNotFound:
        versions = []
    keys = []
    for item in versions:
        if item.enabled:
            keys.append(load_signing_key(await store.get(SIGNING_KEY_SECRET, item.version)))
    return KeyRing.of(keys)


async def add_signing_key(store: SecretStore) -> SigningKey:
    """Store a new key pair as the newest version: it becomes the signer on the next load."""
    pem = generate_pem()
    kid = thumbprint(public_jwk(load_signing_key(_unsaved(pem)).public_key))
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


def _unsaved(pem: str) -> SecretVersion:
    return SecretVersion(name=SIGNING_KEY_SECRET, version="new", value=pem)
