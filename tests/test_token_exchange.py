"""RFC 8693 token exchange: a mobile app's IdP token, verified against the IdP's JWKS, for ours."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from speechgate.core.clients import ClientPolicy, PolicyError
from tests.fakes.idp import AUDIENCE, ISSUER, FakeIdp, b64, unsigned_token
from tests.support.processes import wait_until
from tests.support.servers import ServerThread
from tests.support.services import TokenService

TE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"


@pytest.fixture
def idp() -> Iterator[tuple[FakeIdp, str]]:
    fake = FakeIdp()
    fake.add_rsa_key("rsa-1")
    fake.add_ec_key("ec-1")
    with ServerThread(fake.app()) as server:
        yield fake, f"{server.url}/jwks"


def exchange(service: TokenService, client_id: str, subject_token: str, **extra: str) -> Any:
    return service.http.post(
        "/v1/token",
        data={
            "grant_type": TE,
            "client_id": client_id,
            "subject_token": subject_token,
            "subject_token_type": ID_TOKEN,
            **extra,
        },
    )


def public_client(service: TokenService, jwks_uri: str, **fields: Any) -> str:
    client_id, _ = service.add_client(
        public=True, idp={"issuer": ISSUER, "jwks_uri": jwks_uri, "audience": AUDIENCE}, **fields
    )
    return client_id


def test_idp_token_is_exchanged_for_ours_with_the_idp_subject(
    service: TokenService, idp: tuple[FakeIdp, str]
) -> None:
    fake, uri = idp
    client_id = public_client(service, uri)
    for kid in ("rsa-1", "ec-1"):
        response = exchange(
            service, client_id, fake.id_token(kid, sub="alice@example"), scope="speech:recognize"
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
        claims = jwt.decode(body["access_token"], options={"verify_signature": False})
        assert claims["sub"] == "alice@example"
        assert claims["client_id"] == client_id
        assert claims["iss"] == service.settings.issuer
        assert claims["scope"] == "speech:recognize"


def _hs256_with_public_key(fake: FakeIdp) -> str:
    """Algorithm confusion: HMAC-signed with the IdP's *public* key, which anyone can fetch."""
    public_pem = (
        fake.keys["rsa-1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 600}
    signing_input = unsigned_token(header, payload).rsplit(".", 1)[0]
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def _alg_none() -> str:
    now = int(time.time())
    return unsigned_token(
        {"alg": "none", "kid": "rsa-1"}, {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 600}
    )


def _duplicate_sub(fake: FakeIdp) -> str:
    token = fake.id_token("rsa-1")
    header, payload, signature = token.split(".")
    raw = jwt.utils.base64url_decode(payload).decode()
    forged = raw[:-1] + ',"sub":"mallory"}'
    return ".".join([header, b64(forged.encode()), signature])


BAD_TOKENS: dict[str, tuple[Any, str]] = {
    "expired": (lambda f: f.id_token("rsa-1", exp=int(time.time()) - 3600), "expired"),
    "not yet valid": (lambda f: f.id_token("rsa-1", nbf=int(time.time()) + 3600), "not yet valid"),
    "another audience": (lambda f: f.id_token("rsa-1", aud="another-app"), "another audience"),
    "unknown issuer": (lambda f: f.id_token("rsa-1", iss="https://evil.example"), "unexpected issuer"),
    "no subject": (lambda f: f.id_token("rsa-1", sub=None), "'sub'"),
    "no expiry": (lambda f: f.id_token("rsa-1", exp=None), "'exp'"),
    "alg none": (lambda f: _alg_none(), "algorithm 'none'"),
    "HS256 with the IdP's public key": (_hs256_with_public_key, "algorithm 'HS256'"),
    "ES256 header on an RSA key": (
        lambda f: unsigned_token(
            {"alg": "ES256", "kid": "rsa-1"},
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60},
            b"\0" * 64,
        ),
        "does not fit the RSA key",
    ),
    "tampered signature": (lambda f: f.id_token("rsa-1")[:-6] + "AAAAAA", "invalid signature"),
    "unknown key id": (lambda f: f.id_token("rsa-1", headers={"kid": "nobody"}), "does not publish"),
    "duplicated claim": (_duplicate_sub, "duplicate member 'sub'"),
    "not a JWT": (lambda f: "not-a-jwt", "malformed"),
    "oversized": (lambda f: f.id_token("rsa-1", pad="x" * 9000), "longer than"),
    "critical header": (lambda f: f.id_token("rsa-1", headers={"crit": ["exp"]}), "critical"),
    "newline in sub": (lambda f: f.id_token("rsa-1", sub="alice\nbob"), "printable"),
    "escape in sub": (lambda f: f.id_token("rsa-1", sub="alice\x1b[31m"), "printable"),
    "NUL in sub": (lambda f: f.id_token("rsa-1", sub="alice\x00"), "printable"),
    "DPoP proof": (lambda f: f.id_token("rsa-1", headers={"typ": "dpop+jwt"}), "typ"),
    "logout token": (lambda f: f.id_token("rsa-1", headers={"typ": "logout+jwt"}), "typ"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_subject_token_is_invalid_grant(
    service: TokenService, idp: tuple[FakeIdp, str], case: str
) -> None:
    fake, uri = idp
    client_id = public_client(service, uri)
    build, words = BAD_TOKENS[case]
    response = exchange(service, client_id, build(fake))
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_grant"
    assert words in response.json()["error_description"]


def test_our_own_access_token_is_not_accepted_as_identity(
    service: TokenService,
) -> None:
    backend_id, secret = service.add_client()
    ours = service.token(backend_id, secret).json()["access_token"]
    client_id, _ = service.add_client(
        public=True,
        idp={
            "issuer": service.settings.issuer,
            "jwks_uri": f"{service.url}/.well-known/jwks.json",
            "audience": service.settings.audience,
            "algorithms": ["ES256"],
        },
    )
    response = exchange(service, client_id, ours)
    assert response.status_code == 400
    assert "not from us" in response.json()["error_description"]


REQUEST_ERRORS: dict[str, tuple[dict[str, str], int, str, str]] = {
    "missing subject_token": ({"subject_token": ""}, 400, "invalid_request", "subject_token"),
    "unknown subject_token_type": (
        {"subject_token_type": "urn:x"},
        400,
        "invalid_request",
        "subject_token_type",
    ),
    "unsupported requested_token_type": (
        {"requested_token_type": "urn:ietf:params:oauth:token-type:saml2"},
        400,
        "invalid_request",
        "requested_token_type",
    ),
    "another audience": ({"audience": "https://other.example"}, 400, "invalid_target", "audience"),
    "subject parameter": ({"subject": "bob"}, 400, "invalid_request", "subject_token"),
    "secret sent by a public client": ({"client_secret": "guess"}, 401, "invalid_client", "public client"),
    "scope not allowed": ({"scope": "speech:synthesize"}, 400, "invalid_scope", "speech:synthesize"),
}


@pytest.mark.parametrize("case", list(REQUEST_ERRORS))
def test_malformed_exchange_requests_are_refused(
    service: TokenService, idp: tuple[FakeIdp, str], case: str
) -> None:
    fake, uri = idp
    client_id = public_client(service, uri, scopes=["speech:recognize"])
    extra, status, error, words = REQUEST_ERRORS[case]
    data = {
        "grant_type": TE,
        "client_id": client_id,
        "subject_token": fake.id_token("rsa-1"),
        "subject_token_type": ID_TOKEN,
        **extra,
    }
    response = service.http.post("/v1/token", data=data)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert words in response.json()["error_description"]


def test_unknown_kid_refetches_the_jwks_once_the_idp_rotated(
    start_service: Any, idp: tuple[FakeIdp, str]
) -> None:
    fake, uri = idp
    service = start_service(idp_jwks_min_refresh_s=0.0)
    client_id = public_client(service, uri)
    assert exchange(service, client_id, fake.id_token("rsa-1")).status_code == 200
    fetches = fake.fetches
    fake.add_rsa_key("rsa-2")  # the IdP rotates
    response = exchange(service, client_id, fake.id_token("rsa-2"))
    assert response.status_code == 200, response.text
    assert fake.fetches == fetches + 1


def test_unknown_kids_cannot_make_us_hammer_the_idp(start_service: Any, idp: tuple[FakeIdp, str]) -> None:
    fake, uri = idp
    service = start_service(idp_jwks_min_refresh_s=3600.0)
    client_id = public_client(service, uri)
    assert exchange(service, client_id, fake.id_token("rsa-1")).status_code == 200
    for n in range(5):
        token = fake.id_token("rsa-1", headers={"kid": f"made-up-{n}"})
        assert exchange(service, client_id, token).status_code == 400
    assert fake.fetches == 1


def test_cached_keys_are_kept_while_the_idp_is_down(start_service: Any, idp: tuple[FakeIdp, str]) -> None:
    fake, uri = idp
    service = start_service(idp_jwks_min_refresh_s=0.0, idp_jwks_max_age_s=0.0)  # refetch every time
    client_id = public_client(service, uri)
    assert exchange(service, client_id, fake.id_token("rsa-1")).status_code == 200
    fake.failing = True
    response = exchange(service, client_id, fake.id_token("rsa-1"))
    assert response.status_code == 200, response.text  # answered from the cached keys
    assert wait_until(lambda: fake.fetches >= 2)  # it did try again (meanwhile), and kept them


def test_an_idp_that_trickles_its_jwks_costs_one_fetch_and_holds_no_request_past_the_deadline(
    start_service: Any, idp: tuple[FakeIdp, str]
) -> None:
    """A JWKS sent a byte at a time once held a token exchange 64 s, and every request for that
    client piled up behind it. Now: one fetch in flight, under one deadline; requests the cached
    keys answer are answered meanwhile."""
    fake, uri = idp
    service = start_service(idp_jwks_min_refresh_s=0.0, idp_jwks_timeout_s=4.0)
    client_id = public_client(service, uri)
    assert exchange(service, client_id, fake.id_token("rsa-1")).status_code == 200
    fetches = fake.fetches
    fake.add_rsa_key("rsa-2")  # the IdP rotates, and stalls: a byte every 0.2 s, ~20 minutes a JWKS
    fake.trickle_s = 0.2

    def ask(kid: str) -> httpx.Response:
        form = {"grant_type": TE, "client_id": client_id, "subject_token": fake.id_token(kid)}
        return httpx.post(
            f"{service.url}/v1/token", data={**form, "subject_token_type": ID_TOKEN}, timeout=60
        )

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        new = [pool.submit(ask, "rsa-2") for _ in range(4)]
        assert wait_until(lambda: fake.fetches == fetches + 1)  # the fetch is under way
        old = [pool.submit(ask, "rsa-1") for _ in range(4)]
        old_answers, new_answers = [f.result() for f in old], [f.result() for f in new]
    took = time.monotonic() - started
    assert [r.status_code for r in old_answers] == [200] * 4  # the cached key, without waiting
    assert all(r.elapsed.total_seconds() < 3.0 for r in old_answers)
    assert [r.status_code for r in new_answers] == [400] * 4  # the fetch gave nothing: unknown key
    assert fake.fetches == fetches + 1  # one fetch for all of them
    assert took < 30  # the deadline (4 s), not the trickle's 20 minutes


def test_idp_unreachable_with_nothing_cached_is_a_retryable_503(
    service: TokenService, idp: tuple[FakeIdp, str]
) -> None:
    fake, uri = idp
    fake.failing = True
    client_id = public_client(service, uri)
    response = exchange(service, client_id, fake.id_token("rsa-1"))
    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert int(response.headers["retry-after"]) > 0


def test_symmetric_keys_in_the_jwks_are_never_used(service: TokenService, idp: tuple[FakeIdp, str]) -> None:
    fake, uri = idp
    secret = b"published-in-the-clear-for-all-to-see"
    fake.extra_jwks.append({"kty": "oct", "kid": "hmac", "k": b64(secret), "alg": "HS256"})
    client_id, _ = service.add_client(
        public=True, idp={"issuer": ISSUER, "jwks_uri": uri, "audience": AUDIENCE, "algorithms": ["RS256"]}
    )
    forged = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60},
        secret,
        algorithm="HS256",
        headers={"kid": "hmac"},
    )
    response = exchange(service, client_id, forged)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_concurrent_exchanges_on_a_cold_cache_all_wait_for_the_one_fetch(
    service: TokenService, idp: tuple[FakeIdp, str]
) -> None:
    fake, uri = idp
    client_id = public_client(service, uri)
    tokens = [fake.id_token("rsa-1", sub=f"user-{n}") for n in range(16)]
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda t: exchange(service, client_id, t).status_code, tokens))
    assert statuses == [200] * 16
    assert fake.fetches == 1


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt", "application/at+jwt", None])
def test_id_and_access_tokens_of_the_idp_are_taken(
    service: TokenService, idp: tuple[FakeIdp, str], typ: str | None
) -> None:
    fake, uri = idp
    headers = {"typ": typ} if typ else {}
    response = exchange(service, public_client(service, uri), fake.id_token("rsa-1", headers=headers))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("https://login.example/keys", True),
        ("http://127.0.0.1:9000/keys", True),  # loopback: a local IdP in development
        ("http://localhost:9000/keys", True),
        ("http://login.example/keys", False),
        ("ftp://login.example/keys", False),
    ],
)
def test_an_idp_jwks_is_fetched_over_https_outside_loopback(uri: str, allowed: bool) -> None:
    doc = {"client_id": "mobile", "idp": {"issuer": ISSUER, "jwks_uri": uri, "audience": AUDIENCE}}
    if allowed:
        assert ClientPolicy.from_dict(doc).idp is not None
        return
    with pytest.raises(PolicyError, match="https"):
        ClientPolicy.from_dict(doc)


def test_an_oversized_jwks_is_refused_without_being_read_whole(
    service: TokenService, idp: tuple[FakeIdp, str]
) -> None:
    fake, uri = idp
    fake.flood_bytes = 200 * 2**20  # 200 MB
    response = exchange(service, public_client(service, uri), fake.id_token("rsa-1"))
    assert response.status_code == 503  # the keys were never fetched: retry later
    assert response.json()["error"] == "temporarily_unavailable"
    # Read up to the cap; what the kernel buffers between the two (its autotuning limits, which
    # differ per machine) may have left the IdP too, but not the rest of the 200 MB.
    receive = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    send = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    assert fake.served_bytes < receive + send + 4 * 2**20


@pytest.mark.parametrize("actor", ["garbage", "actor_token_type"])
def test_an_actor_token_is_refused_never_ignored(
    service: TokenService, idp: tuple[FakeIdp, str], actor: str
) -> None:
    """A garbage `actor_token` was once accepted and ignored: the token issued said nothing of an
    actor. Delegation is not offered, so the request is refused and says so."""
    fake, uri = idp
    client_id = public_client(service, uri)
    extra = {"actor_token": "garbage"} if actor == "garbage" else {"actor_token_type": ID_TOKEN}
    response = exchange(service, client_id, fake.id_token("ec-1", sub="alice@example"), **extra)
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_request",
        "error_description": "actor_token is not supported: send the user's subject_token alone",
    }
