"""The OAuth contract as standard client libraries see it: authlib and oauth4webapi (none of ours)
discovers the token service from its RFC 8414 metadata, validates that metadata, gets a token by
client credentials, introspects it (RFC 7662), revokes it (RFC 7009) and introspects it again."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import httpx
import pytest
from authlib.integrations.httpx_client import OAuth2Client
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata

from tests.support.js_sdk import JS
from tests.support.processes import free_port
from tests.support.services import TokenService


@pytest.fixture
def discovered(start_service: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[TokenService, dict[str, Any]]:
    """A token service whose issuer is its own loopback address, and its metadata as fetched."""
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")  # authlib's own switch for http:// on loopback
    port = free_port()
    service: TokenService = start_service(issuer=f"http://127.0.0.1:{port}", port=port)
    metadata = httpx.get(f"{service.url}/.well-known/oauth-authorization-server").json()
    return service, metadata


def test_the_metadata_passes_authlibs_rfc8414_validation(
    discovered: tuple[TokenService, dict[str, Any]],
) -> None:
    service, metadata = discovered
    AuthorizationServerMetadata(metadata).validate()  # raised on response_types_supported: [] once
    assert metadata["issuer"] == service.settings.issuer
    assert metadata["introspection_endpoint"] == f"{service.url}/v1/introspect"


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
def test_a_standard_client_gets_introspects_and_revokes_a_token(
    discovered: tuple[TokenService, dict[str, Any]], auth_method: str
) -> None:
    service, metadata = discovered
    client_id, secret = service.add_client(token_ttl_s=300)
    with OAuth2Client(client_id, secret, token_endpoint_auth_method=auth_method) as oauth:
        token = oauth.fetch_token(metadata["token_endpoint"], grant_type="client_credentials")
        assert token["token_type"] == "Bearer"
        access = token["access_token"]
        info = oauth.introspect_token(metadata["introspection_endpoint"], token=access)
        assert info.status_code == 200
        assert info.headers["cache-control"] == "no-store"
        active = info.json()
        assert active["active"] is True
        assert (active["client_id"], active["sub"], active["token_type"]) == (client_id, client_id, "Bearer")
        assert active["scope"] == token["scope"]
        assert active["exp"] - active["iat"] == 300
        assert active["iss"] == service.settings.issuer
        assert oauth.revoke_token(metadata["revocation_endpoint"], token=access).status_code == 200
        again = oauth.introspect_token(metadata["introspection_endpoint"], token=access)
        assert again.json() == {"active": False}


def test_introspection_tells_nothing_of_tokens_that_are_not_the_callers(
    discovered: tuple[TokenService, dict[str, Any]],
) -> None:
    service, metadata = discovered
    mine, theirs = service.add_client(), service.add_client()
    their_token = service.token(*theirs).json()["access_token"]
    my_token = service.token(*mine).json()["access_token"]
    with OAuth2Client(*mine) as oauth:
        endpoint = metadata["introspection_endpoint"]
        for token in (their_token, "not-a-token", their_token[:-4] + "AAAA"):
            assert oauth.introspect_token(endpoint, token=token).json() == {"active": False}
        assert oauth.introspect_token(endpoint, token=my_token).json()["active"] is True
    # No client authentication: no answer about any token.
    refused = httpx.post(endpoint, data={"token": their_token, "client_id": "nobody"})
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"


def test_openid_discovery_is_told_where_the_oauth_metadata_is(
    discovered: tuple[TokenService, dict[str, Any]],
) -> None:
    """openid-client's default discovery asks here first; this is no OpenID provider."""
    service, _ = discovered
    answer = httpx.get(f"{service.url}/.well-known/openid-configuration")
    assert answer.status_code == 404
    assert "/.well-known/oauth-authorization-server" in answer.json()["error_description"]


def test_oauth4webapi_discovers_gets_introspects_and_revokes(
    discovered: tuple[TokenService, dict[str, Any]], node: str
) -> None:
    """The npm package openid-client is built on, as an app backend on Node uses it."""
    service, _ = discovered
    client_id, secret = service.add_client()
    done = subprocess.run(
        [node, str(JS / "oauth.mjs"), service.settings.issuer, client_id, secret],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["token_type"].lower() == "bearer"
    assert out["before"] == {"active": True, "client_id": client_id, "sub": client_id, "scope": out["scope"]}
    assert out["after"] == {"active": False}
