"""Hostile input gets the documented answer, never a 5xx or a dead connection: every parser of
untrusted input, on both services."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay import usp
from tests.conftest import TokenService
from tests.relays import Stack

DEPTH = 5000  # far past the interpreter's recursion limit


def nested(depth: int = DEPTH) -> str:
    return "[" * depth + "]" * depth


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def deep_jwt(depth: int = DEPTH) -> str:
    return f"{b64(json.dumps({'alg': 'ES256', 'typ': 'at+jwt', 'kid': 'k'}))}.{b64(nested(depth))}.c2ln"


@pytest.mark.parametrize("route", ["/v1/token", "/v1/revoke"])
def test_deeply_nested_json_bodies_are_a_400(service: TokenService, route: str) -> None:
    client = service.add_client()
    response = service.http.post(
        route, auth=client, content=nested().encode(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_a_token_with_a_deeply_nested_payload_is_refused_everywhere(service: TokenService) -> None:
    client = service.add_client()
    revoked = service.http.post("/v1/revoke", auth=client, data={"token": deep_jwt()})
    assert revoked.status_code == 200  # RFC 7009: an invalid token is not an error
    public = service.add_client(
        public=True,
        idp={"issuer": "https://idp.example", "jwks_uri": "https://127.0.0.1:9/keys", "audience": "app"},
    )
    exchanged = service.http.post(
        "/v1/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "client_id": public[0],
            "subject_token": deep_jwt(),
            "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
        },
    )
    assert exchanged.status_code == 400
    assert exchanged.json()["error"] == "invalid_grant"


async def test_the_relay_refuses_a_deeply_nested_token_with_401(stack: Stack) -> None:
    bearer = {"Authorization": f"Bearer {deep_jwt(1500)}"}  # nested past the limit, within 8 KiB
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{stack.relay.url}/v1/listen?language=en-US", additional_headers=bearer):
            pass
    assert refused.value.response.status_code == 401


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "message-path"])
async def test_a_deeply_nested_speech_context_closes_with_a_reason(stack_factory: Any, splice: bool) -> None:
    stack: Stack = await asyncio.to_thread(stack_factory, splice=splice)
    client = await asyncio.to_thread(stack.service.add_client, languages=["en-US"])
    token = await asyncio.to_thread(stack.token, client)
    url = f"{stack.relay.url}/speech/recognition/conversation/cognitiveservices/v1?language=en-US"
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await ws.send(usp.encode_text("speech.context", usp.new_request_id(), nested()))
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass
    assert ws.close_code == 4000
    assert "not JSON" in (ws.close_reason or "")


async def test_a_deeply_nested_plain_text_frame_closes_with_1007(stack: Stack) -> None:
    client = await asyncio.to_thread(stack.service.add_client)
    token = await asyncio.to_thread(stack.token, client)
    async with connect(f"{stack.relay.url}/v1/listen?language=en-US&access_token={token}") as ws:
        await ws.send(nested())
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass
    assert ws.close_code == 1007
