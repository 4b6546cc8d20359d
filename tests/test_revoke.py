"""POST /v1/revoke (RFC 7009): a deny entry in Redis until the token can no longer be used."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import redis

from speechgate.core.keyspace import Keyspace
from tests.support.processes import RedisServer
from tests.support.services import TokenService


def test_revoked_jti_is_kept_until_exp_plus_session_and_announced(
    service: TokenService, sync_redis: redis.Redis
) -> None:
    client_id, secret = service.add_client(token_ttl_s=300, max_session_s=600)
    token = service.token(client_id, secret).json()["access_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    keyspace = Keyspace(service.settings.redis_prefix)
    pubsub = sync_redis.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(keyspace.events)
    subscribed = pubsub.get_message(timeout=5)
    assert subscribed is not None
    assert subscribed["type"] == "subscribe"

    response = service.http.post(
        "/v1/revoke", auth=(client_id, secret), data={"token": token, "token_type_hint": "access_token"}
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    ttl = sync_redis.ttl(keyspace.revoked_jti(claims["jti"]))
    expected = claims["exp"] + 600 - time.time()
    assert expected - 5 <= ttl <= expected + 1
    message = pubsub.get_message(timeout=5)
    assert message is not None
    assert json.loads(message["data"]) == {"type": "revoke", "jti": claims["jti"]}
    pubsub.close()


def test_public_client_revokes_with_its_client_id(service: TokenService, sync_redis: redis.Redis) -> None:
    backend_id, secret = service.add_client()
    token = service.token(backend_id, secret).json()["access_token"]
    public_id, _ = service.add_client(
        public=True, idp={"issuer": "https://i", "jwks_uri": "https://i/j", "audience": "a"}
    )
    response = service.http.post("/v1/revoke", data={"client_id": public_id, "token": token})
    assert response.status_code == 400  # not its token
    assert response.json()["error"] == "unauthorized_client"


def test_invalid_token_is_not_an_error_per_rfc7009(service: TokenService) -> None:
    client_id, secret = service.add_client()
    response = service.http.post("/v1/revoke", auth=(client_id, secret), data={"token": "not-a-token"})
    assert response.status_code == 200


def test_revocation_requires_client_authentication_and_a_token(service: TokenService) -> None:
    client_id, secret = service.add_client()
    token = service.token(client_id, secret).json()["access_token"]
    wrong = service.http.post("/v1/revoke", auth=(client_id, "wrong"), data={"token": token})
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"
    missing = service.http.post("/v1/revoke", auth=(client_id, secret), data={})
    assert missing.status_code == 400
    assert "'token'" in missing.json()["error_description"]


def test_revocation_while_redis_is_down_is_a_retryable_503(tmp_path: Path, start_service: Any) -> None:
    own = RedisServer(tmp_path)
    own.start()
    try:
        service = start_service(redis_url=own.url)
        client_id, secret = service.add_client()
        token = service.token(client_id, secret).json()["access_token"]
        own.stop()
        response = service.http.post("/v1/revoke", auth=(client_id, secret), data={"token": token})
        assert response.status_code == 503
        assert response.json()["error"] == "temporarily_unavailable"
        assert response.headers["retry-after"] == "1"
    finally:
        own.stop()


def test_revoking_a_token_again_is_acknowledged_without_announcing_it_again(
    service: TokenService, sync_redis: redis.Redis
) -> None:
    client_id, secret = service.add_client()
    token = service.token(client_id, secret).json()["access_token"]
    channel = Keyspace(service.settings.redis_prefix).events
    pubsub = sync_redis.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(channel)
    assert pubsub.get_message(timeout=5) is not None  # subscribed
    for _ in range(5):
        response = service.http.post("/v1/revoke", auth=(client_id, secret), data={"token": token})
        assert response.status_code == 200
    sync_redis.publish(channel, "end")  # everything published before it has been delivered
    heard = []
    while (message := pubsub.get_message(timeout=5)) is not None and message["data"] not in ("end", b"end"):
        heard.append(json.loads(message["data"]))
    pubsub.close()
    assert len(heard) == 1  # 20,000 revocations of one token once made every relay read 20,000


def test_revocations_are_rate_limited_on_counters_of_their_own(service: TokenService) -> None:
    """A client revoking in a loop is slowed as a client asking for tokens is, and revocations
    do not eat into its token budget (nor do tokens into its revocations)."""
    client_id, secret = service.add_client(rate_limits={"client": "3/minute", "subject": "", "ip": ""})
    tokens = [service.token(client_id, secret) for _ in range(3)]
    assert [r.status_code for r in tokens] == [200, 200, 200]
    answers = [
        service.http.post(
            "/v1/revoke", auth=(client_id, secret), data={"token": tokens[0].json()["access_token"]}
        )
        for _ in range(4)
    ]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert answers[-1].json()["error"] == "slow_down"
    assert int(answers[-1].headers["retry-after"]) >= 1
    assert service.token(client_id, secret).status_code == 429  # its own 3 tokens, as before
