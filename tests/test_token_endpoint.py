"""POST /v1/token with client credentials: success, the token's contents, and every bad input."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import statistics
import time
from typing import Any

import jwt
import pytest

from speechgate.core.clients import secret_name
from speechgate.core.logs import JsonFormatter
from speechgate.token_service.oauth import OAuthError
from speechgate.token_service.service import UNKNOWN_CLIENT
from tests.support.services import TokenService

TE = "urn:ietf:params:oauth:grant-type:token-exchange"


def rfc7638_thumbprint(jwk: dict[str, str]) -> str:
    canonical = json.dumps(
        {k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
    )
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def test_token_verifies_against_the_published_jwks_and_carries_the_clients_limits(
    service: TokenService,
) -> None:
    client_id, secret = service.add_client(
        token_ttl_s=120, max_session_s=900, languages=["en-US", "de-DE"], scopes=["speech:recognize"]
    )
    response = service.token(client_id, secret)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 120
    assert body["scope"] == "speech:recognize"
    assert body["relay_url"] == service.settings.relay_url
    assert response.headers["cache-control"] == "no-store"

    jwks_client = jwt.PyJWKClient(f"{service.url}/.well-known/jwks.json")
    signing_key = jwks_client.get_signing_key_from_jwt(body["access_token"])
    claims = jwt.decode(
        body["access_token"],
        signing_key,
        algorithms=["ES256"],
        audience=service.settings.audience,
        issuer=service.settings.issuer,
    )
    header = jwt.get_unverified_header(body["access_token"])
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "ES256"
    published = service.http.get("/.well-known/jwks.json").json()["keys"]
    assert header["kid"] == rfc7638_thumbprint(published[0]) == published[0]["kid"]
    assert claims["sub"] == client_id
    assert claims["client_id"] == client_id
    assert claims["scope"] == "speech:recognize"
    assert claims["exp"] - claims["iat"] == 120
    assert claims["nbf"] == claims["iat"]
    assert claims["max_session_s"] == 900
    assert claims["lang"] == ["en-US", "de-DE"]
    assert "single_use" not in claims
    assert len(claims["jti"]) >= 16


def test_each_token_has_its_own_jti(service: TokenService) -> None:
    client_id, secret = service.add_client()
    jtis = {
        jwt.decode(
            service.token(client_id, secret).json()["access_token"], options={"verify_signature": False}
        )["jti"]
        for _ in range(5)
    }
    assert len(jtis) == 5


def test_client_secret_in_the_form_body_works_like_basic(service: TokenService) -> None:
    client_id, secret = service.add_client()
    response = service.http.post(
        "/v1/token",
        data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
    )
    assert response.status_code == 200, response.text


def test_json_body_is_accepted(service: TokenService) -> None:
    client_id, secret = service.add_client()
    response = service.http.post(
        "/v1/token",
        json={
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": secret,
            "single_use": True,
            "expires_in": 60,  # a number, as JSON clients write it (once refused: "must be a string")
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["expires_in"] == 60
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["single_use"] is True
    assert claims["exp"] - claims["iat"] == 60


def test_backend_mints_a_token_for_its_own_user_with_subject(service: TokenService) -> None:
    client_id, secret = service.add_client()
    token = service.token(client_id, secret, subject="user-42").json()["access_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "user-42"
    assert claims["client_id"] == client_id


def test_scope_language_and_single_use_narrow_the_token(service: TokenService) -> None:
    client_id, secret = service.add_client(languages=["en-US", "fr-FR"])
    response = service.token(
        client_id, secret, scope="speech:synthesize", language="fr-FR", single_use="true"
    )
    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["scope"] == "speech:synthesize"
    assert claims["lang"] == ["fr-FR"]
    assert claims["single_use"] is True


def _basic(value: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(value.encode()).decode()}


@pytest.fixture
def confidential(service: TokenService) -> tuple[str, str]:
    return service.add_client(languages=["en-US"], scopes=["speech:recognize"])


# Each case: (request arguments from the client's credentials, status, error, words in the description)
CASES: dict[str, tuple[Any, int, str, str]] = {
    "unknown grant": (
        lambda c, s: {"auth": (c, s), "data": {"grant_type": "password"}},
        400,
        "unsupported_grant_type",
        "grant_type must be",
    ),
    "missing grant_type": (
        lambda c, s: {"auth": (c, s), "data": {"scope": "speech:recognize"}},
        400,
        "invalid_request",
        "grant_type",
    ),
    "wrong secret": (
        lambda c, s: {"auth": (c, s + "x"), "data": {"grant_type": "client_credentials"}},
        401,
        "invalid_client",
        "wrong or missing client_secret",
    ),
    "unknown client": (
        lambda c, s: {"auth": ("no-such-client", s), "data": {"grant_type": "client_credentials"}},
        401,
        "invalid_client",
        "unknown client",
    ),
    "malformed client id": (
        lambda c, s: {"auth": ("../../etc", s), "data": {"grant_type": "client_credentials"}},
        401,
        "invalid_client",
        "unknown client",
    ),
    "no credentials": (
        lambda c, s: {"data": {"grant_type": "client_credentials"}},
        401,
        "invalid_client",
        "client_id is required",
    ),
    "client id without secret": (
        lambda c, s: {"data": {"grant_type": "client_credentials", "client_id": c}},
        401,
        "invalid_client",
        "wrong or missing client_secret",
    ),
    "basic not base64": (
        lambda c, s: {
            "headers": {"Authorization": "Basic %%%"},
            "data": {"grant_type": "client_credentials"},
        },
        401,
        "invalid_client",
        "base64",
    ),
    "basic without colon": (
        lambda c, s: {"headers": _basic(c), "data": {"grant_type": "client_credentials"}},
        401,
        "invalid_client",
        "id:secret",
    ),
    "bearer instead of basic": (
        lambda c, s: {
            "headers": {"Authorization": "Bearer abc"},
            "data": {"grant_type": "client_credentials"},
        },
        401,
        "invalid_client",
        "HTTP Basic",
    ),
    "credentials twice": (
        lambda c, s: {"auth": (c, s), "data": {"grant_type": "client_credentials", "client_secret": s}},
        400,
        "invalid_request",
        "once",
    ),
    "repeated parameter": (
        lambda c, s: {
            "auth": (c, s),
            "content": b"grant_type=client_credentials&scope=a&scope=b",
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        },
        400,
        "invalid_request",
        "repeated",
    ),
    "scope not allowed": (
        lambda c, s: {
            "auth": (c, s),
            "data": {"grant_type": "client_credentials", "scope": "speech:synthesize"},
        },
        400,
        "invalid_scope",
        "speech:synthesize",
    ),
    "unknown scope": (
        lambda c, s: {"auth": (c, s), "data": {"grant_type": "client_credentials", "scope": "admin"}},
        400,
        "invalid_scope",
        "admin",
    ),
    "language not allowed": (
        lambda c, s: {"auth": (c, s), "data": {"grant_type": "client_credentials", "language": "de-DE"}},
        400,
        "invalid_scope",
        "de-DE",
    ),
    "language malformed": (
        lambda c, s: {"auth": (c, s), "data": {"grant_type": "client_credentials", "language": "en_US!"}},
        400,
        "invalid_request",
        "locale",
    ),
    "single_use not boolean": (
        lambda c, s: {"auth": (c, s), "data": {"grant_type": "client_credentials", "single_use": "maybe"}},
        400,
        "invalid_request",
        "single_use",
    ),
    "subject too long": (
        lambda c, s: {"auth": (c, s), "data": {"grant_type": "client_credentials", "subject": "u" * 300}},
        400,
        "invalid_request",
        "subject",
    ),
    "subject with control characters": (
        lambda c, s: {"auth": (c, s), "data": {"grant_type": "client_credentials", "subject": "a\nb"}},
        400,
        "invalid_request",
        "subject",
    ),
    "body over 16 KiB": (
        lambda c, s: {"auth": (c, s), "data": {"grant_type": "client_credentials", "pad": "x" * 17000}},
        413,
        "invalid_request",
        "larger than 16384",
    ),
    "chunked body over 16 KiB": (
        lambda c, s: {
            "auth": (c, s),
            "content": iter([b"grant_type=x&pad="] + [b"y" * 4096] * 5),
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        },
        413,
        "invalid_request",
        "larger than",
    ),
    "wrong content type": (
        lambda c, s: {
            "auth": (c, s),
            "content": b"grant_type=client_credentials",
            "headers": {"Content-Type": "text/plain"},
        },
        415,
        "invalid_request",
        "Content-Type",
    ),
    "no content type": (
        lambda c, s: {"auth": (c, s), "content": b"grant_type=client_credentials"},
        415,
        "invalid_request",
        "Content-Type",
    ),
    "non-UTF-8 bytes": (
        lambda c, s: {
            "auth": (c, s),
            "content": b"grant_type=\xff\xfe",
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        },
        400,
        "invalid_request",
        "UTF-8",
    ),
    "percent-encoded non-UTF-8": (
        lambda c, s: {
            "auth": (c, s),
            "content": b"grant_type=%ff%fe",
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        },
        400,
        "invalid_request",
        "form encoding",
    ),
    "malformed form": (
        lambda c, s: {
            "auth": (c, s),
            "content": b"grant_type",
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        },
        400,
        "invalid_request",
        "form encoding",
    ),
    "malformed JSON": (
        lambda c, s: {
            "auth": (c, s),
            "content": b"{grant_type",
            "headers": {"Content-Type": "application/json"},
        },
        400,
        "invalid_request",
        "not valid JSON",
    ),
    "JSON not an object": (
        lambda c, s: {"auth": (c, s), "json": ["client_credentials"]},
        400,
        "invalid_request",
        "object",
    ),
    "JSON object parameter": (
        lambda c, s: {"auth": (c, s), "json": {"grant_type": {"type": "client_credentials"}}},
        400,
        "invalid_request",
        "must be a string, a number or a boolean",
    ),
    "JSON duplicate member": (
        lambda c, s: {
            "auth": (c, s),
            "content": b'{"grant_type":"a","grant_type":"client_credentials"}',
            "headers": {"Content-Type": "application/json"},
        },
        400,
        "invalid_request",
        "repeated",
    ),
    "token exchange without identity provider": (
        lambda c, s: {
            "auth": (c, s),
            "data": {
                "grant_type": TE,
                "subject_token": "x",
                "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
            },
        },
        400,
        "unauthorized_client",
        "identity provider",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_the_precise_oauth_error(
    service: TokenService, confidential: tuple[str, str], case: str
) -> None:
    build, status, error, words = CASES[case]
    response = service.http.post("/v1/token", **build(*confidential))
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert words in body["error_description"]
    assert response.headers["cache-control"] == "no-store"
    assert "Traceback" not in response.text
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Basic")


def test_disabled_client_is_refused(service: TokenService) -> None:
    client_id, secret = service.add_client(enabled=False)
    response = service.token(client_id, secret)
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_client", "error_description": "this client is disabled"}


def test_client_whose_store_version_is_disabled_is_refused(service: TokenService) -> None:
    client_id, secret = service.add_client()

    async def disable() -> None:
        versions = await service.store.versions(secret_name(client_id))
        await service.store.update(secret_name(client_id), versions[-1].version, enabled=False)

    asyncio.run(disable())
    response = service.token(client_id, secret)
    assert response.status_code == 401
    # Its secret cannot be read to be checked, so it is answered as an unknown client is.
    assert response.json()["error_description"] == UNKNOWN_CLIENT


IDP_FIELDS = {"issuer": "https://idp.example", "jwks_uri": "https://idp.example/jwks", "audience": "app"}


def test_public_client_may_not_use_client_credentials(service: TokenService) -> None:
    client_id, _ = service.add_client(public=True, idp=IDP_FIELDS)
    response = service.http.post(
        "/v1/token", data={"grant_type": "client_credentials", "client_id": client_id}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"


def test_unknown_route_and_method_answer_json_errors(service: TokenService) -> None:
    missing = service.http.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    wrong_method = service.http.get("/v1/token")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"] == "invalid_request"


def test_no_secret_or_token_reaches_the_logs(service: TokenService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client_id, secret = service.add_client()
    token = service.token(client_id, secret).json()["access_token"]
    service.token(client_id, secret + "wrong")
    service.http.post("/v1/token", auth=(client_id, secret), data={"grant_type": "nope"})
    service.http.post("/v1/revoke", auth=(client_id, secret), data={"token": token})
    assert "token revoked" in caplog.text  # the log is captured at all
    assert "invalid_client" in caplog.text
    for value in (secret, token, token.split(".")[2]):
        assert value not in caplog.text


def test_metrics_count_issued_and_refused_tokens(service: TokenService) -> None:
    client_id, secret = service.add_client()
    service.token(client_id, secret)
    service.token(client_id, secret + "x")
    service.token(client_id, secret, scope="speech:everything")
    service.http.get("/no/such/page")
    text = service.http.get("/metrics").text
    assert f'speechgate_tokens_issued_total{{client="{client_id}",grant="client_credentials"}} 1.0' in text
    # Refused before authentication: no client label (ids from the internet would grow the series).
    assert (
        'speechgate_tokens_refused_total{client="-",grant="client_credentials",reason="invalid_client"} 1.0'
        in text
    )
    assert (
        f'speechgate_tokens_refused_total{{client="{client_id}",grant="client_credentials",'
        'reason="invalid_scope"} 1.0' in text
    )
    assert 'speechgate_http_requests_total{route="/v1/token",status="200"} 1.0' in text
    assert 'speechgate_http_requests_total{route="/v1/token",status="401"} 1.0' in text
    assert 'speechgate_http_requests_total{route="other",status="404"} 1.0' in text
    assert "speechgate_redis_up 1.0" in text
    assert "speechgate_token_request_seconds_count" in text
    assert 'speechgate_key_created_timestamp_seconds{key="signing"}' in text


def test_metadata_jwks_openapi_and_health(service: TokenService) -> None:
    meta = service.http.get("/.well-known/oauth-authorization-server").json()
    assert meta["issuer"] == service.settings.issuer
    assert meta["token_endpoint"].endswith("/v1/token")
    assert meta["revocation_endpoint"].endswith("/v1/revoke")
    assert TE in meta["grant_types_supported"]
    # every scope a client may be given, translation too (the list was once written by hand)
    assert meta["scopes_supported"] == ["speech:recognize", "speech:synthesize", "speech:translate"]
    keys = service.http.get("/.well-known/jwks.json").json()["keys"]
    assert [k["alg"] for k in keys] == ["ES256"]
    assert all("d" not in k for k in keys)  # never the private part
    doc = service.http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert "/v1/token" in doc["paths"]
    assert service.http.get("/healthz").json() == {"status": "ok"}
    ready = service.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


def test_two_services_do_not_share_state_through_globals(start_service: Any) -> None:
    first, second = start_service(), start_service()
    assert first.http.get("/.well-known/jwks.json").json() != second.http.get("/.well-known/jwks.json").json()
    client_id, secret = first.add_client()
    assert first.token(client_id, secret).status_code == 200
    assert second.token(client_id, secret).status_code == 401


def test_request_without_redis_uses_per_process_limits(start_service: Any) -> None:
    service = start_service(with_redis=False)
    client_id, secret = service.add_client(rate_limits={"client": "2/minute", "subject": "", "ip": ""})
    statuses = [service.token(client_id, secret).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert service.http.get("/readyz").json()["checks"]["redis"].startswith("not configured")


def test_one_json_access_line_per_request_without_secrets(
    service: TokenService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="speechgate.access")
    client_id, secret = service.add_client()
    issued = service.http.post(
        "/v1/token",
        auth=(client_id, secret),
        data={"grant_type": "client_credentials"},
        headers={"X-Request-Id": "trace-42.a_b"},
    )
    refused = service.token(client_id, secret + "x")
    odd = service.http.get("/healthz", headers={"X-Request-Id": "no spaces; " + "x" * 80})
    assert issued.headers["x-request-id"] == "trace-42.a_b"  # a caller's id is kept for tracing
    assert len(odd.headers["x-request-id"]) == 32  # a strange one is replaced
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "speechgate.access"]
    token_lines = [line for line in lines if line["path"] == "/v1/token"]
    assert [(x["status"], x["client"], x["outcome"]) for x in token_lines] == [
        (200, client_id, "issued"),
        (401, None, "invalid_client"),
    ]
    assert token_lines[0]["request_id"] == "trace-42.a_b"
    assert token_lines[1]["request_id"] == refused.headers["x-request-id"]
    assert all(
        x["event"] == "request" and x["method"] == "POST" and x["duration_ms"] > 0 for x in token_lines
    )
    everything = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    for secret_text in (secret, issued.json()["access_token"]):
        assert secret_text not in everything


@pytest.mark.parametrize(
    ("asked", "status", "expires_in"),
    [
        ("60", 200, 60),
        ("1", 200, 1),
        ("120", 200, 120),
        ("121", 400, None),
        ("0", 400, None),
        ("1.5", 400, None),
        ("²", 400, None),
    ],
)
def test_the_app_may_ask_for_a_shorter_lifetime_never_a_longer_one(
    service: TokenService, asked: str, status: int, expires_in: int | None
) -> None:
    client_id, secret = service.add_client(token_ttl_s=120)
    response = service.token(client_id, secret, expires_in=asked)
    assert response.status_code == status, response.text
    if expires_in is None:
        assert response.json()["error"] == "invalid_request"
        assert "expires_in" in response.json()["error_description"]
        return
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert response.json()["expires_in"] == expires_in
    assert claims["exp"] - claims["iat"] == expires_in


def test_unknown_client_and_wrong_secret_are_told_and_timed_alike(service: TokenService) -> None:
    """Neither the answer nor the work tells an attacker whether a client id exists: an unknown id,
    a wrong secret and a client disabled in the store (whose secret cannot be checked) get the
    same message, after the same work (one keyed hash)."""
    known, _ = service.add_client()
    disabled, secret = service.add_client()

    async def disable() -> None:
        versions = await service.store.versions(secret_name(disabled))
        await service.store.update(secret_name(disabled), versions[-1].version, enabled=False)

    asyncio.run(disable())
    public, _ = service.add_client(public=True, idp=IDP_FIELDS)
    answers = {
        service.token(client, "wrong-" + secret).json()["error_description"]
        for client in (known, "speechgate-nobody", disabled, public)
    }
    # With no secret at all: a known confidential client once got "must authenticate with its
    # client_secret", an unknown one "unknown client": the id's existence, told.
    for client in (known, "speechgate-nobody", disabled):
        form = {"grant_type": "client_credentials", "client_id": client}
        answer = service.http.post("/v1/token", data=form)
        assert answer.status_code == 401
        answers.add(answer.json()["error_description"])
    assert answers == {UNKNOWN_CLIENT}

    core = service.app.state.service

    async def timings() -> dict[str, float]:
        samples: dict[str, list[int]] = {"known": [], "unknown": []}
        for _ in range(3000):  # interleaved: both see the same machine noise
            for name, client in (("known", known), ("unknown", "speechgate-nobody")):
                started = time.perf_counter_ns()
                with contextlib.suppress(OAuthError):
                    await core.authenticate(client, "wrong-" + secret)
                samples[name].append(time.perf_counter_ns() - started)
        return {name: statistics.median(values) for name, values in samples.items()}

    medians = asyncio.run(timings())
    assert 0.85 < medians["unknown"] / medians["known"] < 1.18, medians
