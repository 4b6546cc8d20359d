"""Our access tokens: what `verify` (used by the relay too) refuses, and why."""

from __future__ import annotations

import asyncio
import re
import time

import jwt
import pytest

from speechgate.core.claims import AccessClaims, InvalidToken, sign, verify
from speechgate.core.keys import (
    SIGNING_KEY_SECRET,
    KeyRing,
    Rotation,
    SigningKey,
    add_signing_key,
    load_keyring,
    rotate_signing_key,
)
from speechgate.core.store import MemoryStore, SecretVersion
from tests.fakes.idp import b64, unsigned_token
from tests.support.claims import access_claims

ISSUER, AUDIENCE = "https://tokens.example", "speechgate-relay"


@pytest.fixture(scope="module")
def ring() -> KeyRing:
    async def make() -> KeyRing:
        store = MemoryStore()
        await add_signing_key(store)
        await add_signing_key(store)
        return await load_keyring(store)

    return asyncio.run(make())


def claims(**changes: object) -> AccessClaims:
    defaults: dict[str, object] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "client_id": "app-1"}
    return access_claims(**{**defaults, "jti": "jti-1", "lang": ("en-US",), **changes})


def check(token: str, ring: KeyRing, **options: object) -> AccessClaims:
    return verify(token, ring.public_keys(), issuer=ISSUER, audience=AUDIENCE, **options)  # type: ignore[arg-type]


def test_signed_claims_round_trip(ring: KeyRing) -> None:
    original = claims(single_use=True)
    assert check(sign(original, ring.signer), ring) == original


def test_the_newest_key_signs_and_the_older_still_verifies(ring: KeyRing) -> None:
    older = next(k for k in ring.keys.values() if k is not ring.signer)
    assert jwt.get_unverified_header(sign(claims(), ring.signer))["kid"] == ring.signer.kid
    assert check(sign(claims(), older), ring).sub == "user-1"


def test_a_rotated_key_is_published_before_it_signs_and_the_previous_one_lives_on_after() -> None:
    now = int(time.time())

    async def rotate() -> tuple[SigningKey, Rotation, KeyRing, KeyRing, list[SecretVersion]]:
        store = MemoryStore()
        first = await add_signing_key(store)
        rotation = await rotate_signing_key(store, grace_s=600, publish_s=120, now=now)
        rings = await load_keyring(store, now), await load_keyring(store, now + 120)
        return first, rotation, *rings, await store.versions(SIGNING_KEY_SECRET)

    first, rotation, ring, later, versions = asyncio.run(rotate())
    assert set(ring.keys) == {first.kid, rotation.signer_kid}  # both published at once
    assert ring.signer.kid == first.kid
    assert ring.signer_at(now + 119).kid == first.kid
    assert ring.signer_at(now + 120).kid == rotation.signer_kid  # without waiting for a reload
    assert later.signer.kid == rotation.signer_kid
    assert later.upcoming is None
    # Its tokens are issued until the switch, so its grace counts from there.
    assert versions[0].tags["retire-after"] == str(now + 120 + 600)


def test_expired_token_is_refused_unless_the_caller_checks_expiry_itself(ring: KeyRing) -> None:
    token = sign(claims(exp=int(time.time()) - 10), ring.signer)
    with pytest.raises(InvalidToken, match="expired") as info:
        check(token, ring)
    assert info.value.expired
    accepted = check(token, ring, check_exp=False)
    assert accepted.usable_until == accepted.exp + 600


def _forge(ring: KeyRing, header: dict[str, object], payload: dict[str, object]) -> str:
    key: SigningKey = ring.signer
    return jwt.encode(payload, key.private_key, algorithm="ES256", headers=header)


def _payload(**changes: object) -> dict[str, object]:
    return {**claims().to_payload(), **changes}


REFUSED: dict[str, tuple[object, str]] = {
    "another audience": (lambda r: sign(claims(aud="other"), r.signer), "another audience"),
    "another issuer": (lambda r: sign(claims(iss="https://evil"), r.signer), "unexpected issuer"),
    "not yet valid": (lambda r: sign(claims(nbf=int(time.time()) + 600), r.signer), "not yet valid"),
    "wrong typ": (lambda r: _forge(r, {"kid": r.signer.kid, "typ": "JWT"}, _payload()), "at+jwt"),
    "unknown kid": (lambda r: _forge(r, {"kid": "x", "typ": "at+jwt"}, _payload()), "unknown key"),
    "missing claim": (
        lambda r: _forge(
            r, {"kid": r.signer.kid, "typ": "at+jwt"}, {k: v for k, v in _payload().items() if k != "jti"}
        ),
        "'jti'",
    ),
    "claim of the wrong type": (
        lambda r: _forge(r, {"kid": r.signer.kid, "typ": "at+jwt"}, _payload(max_session_s="600")),
        "max_session_s",
    ),
    "alg none": (
        lambda r: unsigned_token({"alg": "none", "kid": r.signer.kid, "typ": "at+jwt"}, _payload()),
        "algorithm must be ES256",
    ),
    "HS256": (
        lambda r: jwt.encode(
            _payload(), "k" * 32, algorithm="HS256", headers={"kid": r.signer.kid, "typ": "at+jwt"}
        ),
        "algorithm must be ES256",
    ),
    "tampered payload": (
        lambda r: ".".join(
            [
                sign(claims(), r.signer).split(".")[0],
                b64(b'{"sub":"admin"}'),
                sign(claims(), r.signer).split(".")[2],
            ]
        ),
        "signature",
    ),
    "duplicate alg": (lambda r: b64(b'{"alg":"none","alg":"ES256"}') + ".e30.", "duplicate member 'alg'"),
    "oversized": (lambda r: sign(claims(sub="x" * 9000), r.signer), "longer than"),
    "garbage": (lambda r: "a.b", "three"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_tokens_are_refused_with_a_reason(ring: KeyRing, case: str) -> None:
    build, words = REFUSED[case]
    assert callable(build)
    with pytest.raises(InvalidToken, match=re.escape(words)):
        check(build(ring), ring)
