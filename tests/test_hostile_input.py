"""Hostile input gets the documented answer, never a 5xx or a dead connection: every parser of
untrusted input, on both services."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from speechgate.core.keyspace import Keyspace
from speechgate.devtools.demo import demo_routes
from speechgate.devtools.dev import DevClient
from speechgate.relay import usp
from speechgate.relay.server import Relay
from tests.support.processes import Process, free_port, wait_until
from tests.support.relays import RelayThread, Stack
from tests.support.services import TokenService

SPEECHGATE = str(Path(sys.executable).parent / "speechgate")

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


async def test_close_codes_an_app_chooses_do_not_become_metric_series(stack: Stack) -> None:
    client = await asyncio.to_thread(stack.service.add_client)
    for code in (4321, 3999, 4999):
        token = await asyncio.to_thread(stack.token, client)
        async with connect(f"{stack.relay.url}/v1/listen?language=en-US&access_token={token}") as ws:
            await ws.close(code, "mine")
    metrics = await asyncio.to_thread(lambda: httpx.get(f"http://127.0.0.1:{stack.relay.port}/metrics").text)
    assert not any(f'code="{code}"' in metrics for code in (4321, 3999, 4999))
    assert wait_until(
        lambda: (
            'speechgate_relay_closes_total{code="other",door="plain"} 3.0'
            in httpx.get(f"http://127.0.0.1:{stack.relay.port}/metrics").text
        )
    )


def test_relay_answers_carry_one_content_type_and_nosniff(stack: Stack) -> None:
    for path in ("/healthz", "/nowhere", "/v1/listen"):
        response = httpx.get(f"http://127.0.0.1:{stack.relay.port}{path}")
        assert response.headers.get_list("content-type") == ["application/json"], path
        assert response.headers["x-content-type-options"] == "nosniff"


def test_token_service_answers_carry_nosniff_and_no_server_name(service: TokenService) -> None:
    for response in (service.http.get("/healthz"), service.http.post("/v1/token", data={})):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "server" not in response.headers


def test_an_unknown_scope_is_echoed_only_in_part(service: TokenService) -> None:
    client = service.add_client()
    asked = " ".join(f"scope-{n}" for n in range(1200))  # about 12 KB
    response = service.token(*client, scope=asked)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"
    assert len(response.json()["error_description"]) < 400


def test_x_forwarded_for_is_ignored_unless_a_proxy_is_trusted(start_service: Any) -> None:
    """Per-address limits key on the peer: a caller cannot pick another address with a header."""
    for trusted, expected in (("", [200, 200, 429, 429]), ("127.0.0.1", [200, 200, 200, 200])):
        service = start_service(forwarded_allow_ips=trusted)
        client = service.add_client(rate_limits={"client": "", "subject": "", "ip": "2/minute"})
        statuses = [
            service.http.post(
                "/v1/token",
                auth=client,
                data={"grant_type": "client_credentials"},
                headers={"X-Forwarded-For": f"192.0.2.{n}"},
            ).status_code
            for n in range(4)
        ]
        assert statuses == expected, trusted


async def test_nothing_is_admitted_for_a_request_that_is_no_upgrade(stack: Stack) -> None:
    """Plain GETs with a valid token, and upgrades websockets refuses, take no stream slot and
    leave nothing behind: the user's two slots stay free for real streams."""
    client = await asyncio.to_thread(stack.service.add_client, max_streams_per_subject=2)
    token = await asyncio.to_thread(stack.token, client)
    base = f"http://127.0.0.1:{stack.relay.port}/v1/listen?language=en-US&access_token={token}"
    async with httpx.AsyncClient() as http:
        for _ in range(3):
            plain = await http.get(base)
            assert plain.status_code == 426
            assert plain.json()["error"] == "upgrade_required"
            assert plain.headers["upgrade"] == "websocket"
        bad_key = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
        for _ in range(3):
            refused = await http.get(base, headers={**bad_key, "Sec-WebSocket-Key": "not-a-key"})
            assert refused.status_code == 400
        probe = await http.get(
            f"http://127.0.0.1:{stack.relay.port}/stt/speech/universal/v2?GenerateRedirectResponse=true"
        )
        assert probe.status_code == 204  # the JavaScript SDK keeps its URL on anything but 200
    keys = Keyspace(stack.service.settings.redis_prefix)
    with redis.Redis.from_url(stack.service.settings.redis_url or "") as db:
        assert await asyncio.to_thread(wait_until, lambda: db.zcard(keys.lease_client(client[0])) == 0)
    assert not stack.relay.relay._pending
    url = f"{stack.relay.url}/v1/listen?language=en-US&access_token="
    tokens = [await asyncio.to_thread(stack.token, client) for _ in range(2)]
    async with connect(url + tokens[0]), connect(url + tokens[1]):
        pass  # both slots were free


def test_subjects_never_share_a_redis_key(service: TokenService) -> None:
    """A subject named like another's previous rate-limit window (`victim/-1`), or with a hash
    tag or glob characters, counts only against itself."""
    client = service.add_client(rate_limits={"client": "", "subject": "5/minute", "ip": ""})
    for subject in ("victim/-1", "victim:x", "{victim}", "victim*"):
        for _ in range(6):
            service.token(*client, subject=subject)
    assert service.token(*client, subject="victim").status_code == 200


@pytest.fixture
def demo_relay(stack: Stack) -> Iterator[RelayThread]:
    """A relay serving the dev demo's routes, its token minted by the stack's token service."""
    client = stack.service.add_client()
    relay = Relay(
        stack.relay.relay.settings,
        stack.service.store,
        None,
        routes=demo_routes(DevClient(*client), stack.service.url, httpx.AsyncClient()),
    )
    with RelayThread(relay) as running:
        yield running


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),
        ({"Origin": "http://127.0.0.1:8001"}, 200),
        ({"Origin": "http://localhost:8001", "Host": "localhost:8001"}, 200),
        ({"Host": "evil.example:8001"}, 403),  # DNS rebinding: a page of evil.example on 127.0.0.1
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": "null"}, 403),
    ],
)
def test_the_demo_token_is_for_pages_of_this_machine_only(
    demo_relay: RelayThread, headers: dict[str, str], status: int
) -> None:
    response = httpx.get(f"http://127.0.0.1:{demo_relay.port}/demo/token", headers=headers)
    assert response.status_code == status, response.text


async def test_a_clients_origin_allow_list_holds_for_browsers(stack: Stack) -> None:
    client = await asyncio.to_thread(stack.service.add_client, origins=["https://app.example"])
    url = f"{stack.relay.url}/v1/listen?language=en-US&access_token="
    token = await asyncio.to_thread(stack.token, client)
    async with connect(url + token, origin=Origin("https://app.example")):
        pass
    async with connect(url + await asyncio.to_thread(stack.token, client)):
        pass  # native SDKs send no Origin
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            url + await asyncio.to_thread(stack.token, client), origin=Origin("https://evil.example")
        ):
            pass
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body or b"{}")["error"] == "origin_not_allowed"


def test_a_header_sent_twice_is_no_server_error(stack: Stack) -> None:
    client = stack.service.add_client()
    token = stack.token(client)
    url = f"http://127.0.0.1:{stack.relay.port}/v1/listen?language=en-US&access_token={token}"
    twice = [
        ("Connection", "keep-alive"),
        ("Connection", "Upgrade"),
        ("Origin", "https://a"),
        ("Origin", "https://b"),
    ]
    response = httpx.get(url, headers=twice)
    assert response.status_code < 500


# --- the token service's HTTP bounds (speechgate/token_service/http.py), on the production command ---------


@contextlib.contextmanager
def production_token_service(workdir: Path, redis_url: str, **settings: str) -> Iterator[tuple[int, Process]]:
    """`speechgate token-service` as production runs it, with these SPEECHGATE_ settings."""
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "SPEECHGATE_STORE_DIR": str(workdir),
        "SPEECHGATE_REDIS_PREFIX": f"test:{port}:",
        **{f"SPEECHGATE_{name.upper()}": value for name, value in settings.items()},
    }
    subprocess.run([SPEECHGATE, "keys", "init"], env=env, check=True, capture_output=True, timeout=60)
    with Process(
        [SPEECHGATE, "token-service", "--port", str(port)], "Uvicorn running on", env=env
    ) as process:
        yield port, process
    client = redis.Redis.from_url(redis_url)  # leave nothing behind
    for key in client.scan_iter(match=f"test:{port}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="module")
def token_service_process(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[tuple[int, Process]]:
    """With 1 s timeouts and 4 connections."""
    with production_token_service(
        tmp_path_factory.mktemp("store"), redis_url, http_timeout_s="1", max_connections="4"
    ) as running:
        yield running


@pytest.fixture
def token_service_command(token_service_process: tuple[int, Process]) -> int:
    return token_service_process[0]


def _exchange(port: int, data: bytes, then_read: bool = True) -> tuple[bytes, float]:
    """Sends `data` on a fresh connection; what comes back until the server closes, and when."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while then_read and (chunk := sock.recv(65536)):
            answer += chunk
    return answer, time.monotonic() - started


def test_a_huge_header_gets_431_at_once_and_costs_others_nothing(token_service_command: int) -> None:
    port = token_service_command
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20)
    answer, took = _exchange(port, head)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"larger than 32768 bytes" in answer
    assert took < 2
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connects and says nothing
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a",  # slowloris: headers never end
        b"POST /v1/token HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\ngrant_type",  # body never ends
    ],
    ids=["idle", "headers", "body"],
)
def test_a_request_that_does_not_arrive_in_time_gets_408_and_is_closed(
    token_service_command: int, sent: bytes
) -> None:
    answer, took = _exchange(token_service_command, sent)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert 0.9 < took < 3


def test_connections_beyond_the_process_limit_get_503_but_probes_are_answered(
    token_service_command: int,
) -> None:
    """Idle connections once made every /healthz a 503: a liveness probe would have had a healthy
    pod restarted by anyone holding connections open."""
    port = token_service_command
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        answer, _ = _exchange(port, b"POST /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ")
        for probe in (b"/healthz", b"/readyz"):
            request = b"GET " + probe + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            answer, _ = _exchange(port, request)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: httpx.post(f"http://127.0.0.1:{port}/v1/token").status_code != 503)


def test_one_address_holds_no_more_than_its_share_of_connections(tmp_path: Path, redis_url: str) -> None:
    with production_token_service(tmp_path, redis_url, max_connections_per_address="3") as (port, _):
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            answer, took = _exchange(port, b"")  # the fourth is answered at once, before it asks
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"more than 3 connections from one address" in answer
            assert took < 5
        finally:
            for sock in held:
                sock.close()
        assert wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200)


def test_a_huge_header_in_one_write_with_its_whole_request_gets_431(token_service_command: int) -> None:
    """The bound once held only across reads: 100 KB of header in the same write as the rest of
    the request reached the app and got 200."""
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\nConnection: close\r\n\r\n"
    many = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"X-Many: aaaaaaaaaa\r\n" * 5000
        + b"Connection: close\r\n\r\n"
    )
    for request in (big, many):
        answer, _ = _exchange(token_service_command, request)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]


def _metric(port: int, status: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("speechgate_http_requests_total{") and f'status="{status}"' in line
    )


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        (b"POST /v1/token HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\ngrant_type=cl", "499"),
        (b"POST /v1/token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n", "400"),
        (b"POST /v1/revoke HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\ntoken=", "408"),
    ],
    ids=["hang-up-mid-body", "bad-chunked-body", "body-timeout"],
)
def test_a_body_that_never_comes_whole_is_the_clients_error_in_one_line(
    token_service_process: tuple[int, Process], sent: bytes, status: str
) -> None:
    """Each was once a 500 with two long tracebacks, counted in the 5xx metric the alerts watch."""
    port, process = token_service_process
    errors_before, seen_before = _metric(port, "500"), _metric(port, status)
    lines_before = len(process.output)
    answer, _ = _exchange(port, sent, then_read=status != "499")  # 499: the client hangs up at once
    if status != "499":
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
    assert wait_until(lambda: _metric(port, status) == seen_before + 1)
    assert _metric(port, "500") == errors_before
    written = "".join(process.output[lines_before:])
    assert "Traceback" not in written
    assert "unhandled error" not in written
