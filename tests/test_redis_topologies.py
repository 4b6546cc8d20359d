"""Sentinel, Cluster and TLS URIs work for real: a Redis Cluster, a Sentinel and a TLS-only Redis with
a password (Azure Cache for Redis's shape) of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trustme
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from speechgate.core.events import EventListener, publish
from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import connect
from speechgate.core.revocation import RedisRevocations
from speechgate.token_service.ratelimit import RedisLimiter, checks_for
from tests.support.claims import access_claims
from tests.support.processes import Process, RedisServer, free_port, wait_until
from tests.support.relays import Stack


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port below 55536 whose cluster-bus port (+10000) is free too."""
    for _ in range(100):
        port = random.randint(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def cluster_node(workdir: Path, port: int) -> Process:
    args = [
        shutil.which("redis-server") or "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        f"nodes-{port}.conf",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]
    return Process(args, "Ready to accept connections").start()


@pytest.fixture(scope="module")
def cluster_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("cluster")
    ports = [cluster_port() for _ in range(3)]
    nodes = [cluster_node(workdir, port) for port in ports]
    addresses = [f"127.0.0.1:{port}" for port in ports]
    try:
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        first = redis.Redis(host="127.0.0.1", port=ports[0], decode_responses=True)

        def cluster_ok() -> bool:
            info = first.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
            return bool(info.get("cluster_state") == "ok")

        assert wait_until(cluster_ok)
        first.close()
        yield "redis+cluster://" + ",".join(addresses)
    finally:
        for node in nodes:
            node.stop()


def limit_counts(uri: str, prefix: str) -> list[bool]:
    async def run() -> list[bool]:
        client = connect(uri)
        limiter = RedisLimiter(client, Keyspace(prefix))
        checks = checks_for("tenant", "alice", "10.1.2.3", "5/minute", "3/minute", "4/minute")
        results = [(await limiter.hit("tenant", "someone", checks)).allowed for _ in range(4)]
        keyspace = Keyspace(prefix)
        revocations = RedisRevocations(client, keyspace)
        now = int(time.time())
        token = access_claims(client_id="tenant", iat=now - 5, nbf=now - 5, exp=now + 60, max_session_s=60)
        await revocations.revoke_jti("j1", now + 60)
        results.append(await revocations.revoked(token, "k1") == "token revoked")
        await revocations.revoke_subject("tenant", "alice", 60)
        results.append(await revocations.revoked(replace(token, jti="j2"), "k1") == "subject revoked")
        await revocations.revoke_signing_key("k2")
        other = replace(token, sub="bob", jti="j3")
        results.append(await revocations.revoked(other, "k2") == "signing key revoked")
        results.append(await revocations.revoked(other, "k1") is None)
        for key in (
            keyspace.revoked_jti("j1"),
            keyspace.revoked_subject("tenant", "alice"),
            keyspace.revoked_signing_keys,
        ):
            await client.delete(key)
        await client.aclose()
        return results

    # three allowed, the fourth refused; then every kind of revocation is visible, and only where due
    return asyncio.run(run())


def test_rate_limits_run_as_one_script_on_a_redis_cluster(cluster_uri: str) -> None:
    # Client, subject and address counters share the {client} hash tag: one slot, one script.
    assert limit_counts(cluster_uri, "sgtest-cluster:") == [True, True, True, False, True, True, True, True]


def test_rate_limits_work_through_sentinel(tmp_path: Path) -> None:
    master = RedisServer(tmp_path)
    master.start()
    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor speechgate 127.0.0.1 {master.port} 1\n")
    sentinel = Process(
        [shutil.which("redis-server") or "redis-server", str(config), "--sentinel"], "+monitor master"
    )
    try:
        sentinel.start()
        assert limit_counts(f"redis+sentinel://127.0.0.1:{port}/speechgate", "sgtest-sentinel:") == [
            True,
            True,
            True,
            False,
            True,
            True,
            True,
            True,
        ]
        with master.client() as client:
            assert client.keys("sgtest-sentinel:rl:*")  # the counters live on the monitored master
    finally:
        sentinel.stop()
        master.stop()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server that takes TLS only, with a password: Azure Cache for Redis's shape (port
    6380, `rediss://`, an access key). Its certificate is for 127.0.0.1, from a CA of the test's."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    port = free_port()
    server = Process(
        [
            shutil.which("redis-server") or "redis-server",
            "--port", "0",
            "--tls-port", str(port),
            "--tls-cert-file", str(tmp_path / "cert.pem"),
            "--tls-key-file", str(tmp_path / "key.pem"),
            "--tls-ca-cert-file", str(tmp_path / "ca.pem"),
            "--tls-auth-clients", "no",
            "--requirepass", "access-key",
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(tmp_path),
        ],
        "Ready to accept connections",
    )  # fmt: skip
    server.start()
    try:
        yield port, tmp_path / "ca.pem"
    finally:
        server.stop()


def test_rate_limits_and_revocations_work_over_tls_with_a_password(tls_redis: tuple[int, Path]) -> None:
    port, ca = tls_redis
    uri = f"rediss://:access-key@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    assert limit_counts(uri, "sgtest-tls:") == [True, True, True, False, True, True, True, True]


@pytest.mark.parametrize(
    ("uri", "error"),
    [
        # the certificate is checked: a CA the client does not trust is refused
        ("rediss://:access-key@127.0.0.1:{port}/0", "certificate verify failed"),
        ("rediss://:wrong@127.0.0.1:{port}/0?ssl_ca_certs={ca}", "invalid username-password"),
        (
            "redis://:access-key@127.0.0.1:{port}/0",
            "Connection reset by peer|Connection closed by server",
        ),  # no TLS
    ],
)
def test_tls_redis_refuses_what_it_should(tls_redis: tuple[int, Path], uri: str, error: str) -> None:
    port, ca = tls_redis

    async def ping() -> None:
        client = connect(uri.format(port=port, ca=ca))
        try:
            await client.ping()
        finally:
            await client.aclose()

    with pytest.raises((redis.RedisError, OSError), match=error):
        asyncio.run(ping())


def test_events_reach_a_fresh_listener_on_a_redis_cluster(cluster_uri: str) -> None:
    """The listener once subscribed before the cluster client had learned the slots: a KeyError,
    which ended its task without a word; no service heard a revocation or a quota change."""

    async def run() -> dict[str, object]:
        keyspace = Keyspace(f"sgtest-events-{random.randrange(10**6)}:")
        listening, publisher = connect(cluster_uri), connect(cluster_uri)  # fresh: no slots known
        heard: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        listener = EventListener(listening, keyspace, heard.put, retry_s=0.1)
        listener.start()
        try:
            await asyncio.wait_for(listener.subscribed.wait(), 20)
            await publish(publisher, keyspace, {"type": "revoke", "jti": "on-a-cluster"})
            return await asyncio.wait_for(heard.get(), 20)
        finally:
            await listener.close()
            await listening.aclose()
            await publisher.aclose()

    assert asyncio.run(run()) == {"type": "revoke", "jti": "on-a-cluster"}


@pytest.fixture
def cluster_stack(cluster_uri: str, stack_factory: Any) -> Stack:
    """A token service, a fake Azure and a relay, all on the Redis Cluster."""
    stack: Stack = stack_factory(redis_url=cluster_uri, service_redis_url=cluster_uri)
    return stack


async def test_a_relay_on_a_redis_cluster_hears_revocations_and_quota_changes(
    cluster_uri: str, cluster_stack: Stack
) -> None:
    """On a cluster the relay once heard no event: a revoked subject's live stream ran to its end,
    and a lowered stream limit reached it only when its client cache expired."""
    stack = cluster_stack
    client_id, secret = await asyncio.to_thread(stack.service.add_client, max_streams_per_subject=5)
    ready = f"http://127.0.0.1:{stack.relay.port}/readyz"
    assert await asyncio.to_thread(
        wait_until, lambda: httpx.get(ready).json()["checks"].get("events") == "ok", 20
    )
    admin = connect(cluster_uri)
    keyspace = Keyspace(stack.service.settings.redis_prefix)
    try:
        alice = await asyncio.to_thread(stack.token, (client_id, secret), subject="alice")
        async with ws_connect(f"{stack.relay.url}/v1/listen?language=en-US&access_token={alice}") as ws:
            started = time.monotonic()
            await RedisRevocations(admin, keyspace).revoke_subject(client_id, "alice", 600)
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1008
        assert time.monotonic() - started < 5  # within a second, and a loaded machine's margin

        bob = [await asyncio.to_thread(stack.token, (client_id, secret), subject="bob") for _ in range(2)]
        async with ws_connect(f"{stack.relay.url}/v1/listen?language=en-US&access_token={bob[0]}"):
            await asyncio.to_thread(stack.service.add_client, client_id, max_streams_per_subject=1)
            await publish(admin, keyspace, {"type": "reload", "what": "client"})  # what `quotas set` does

            async def refused() -> bool:
                try:
                    async with ws_connect(
                        f"{stack.relay.url}/v1/listen?language=en-US&access_token={bob[1]}"
                    ):
                        return False
                except InvalidStatus as exc:
                    return exc.response.status_code == 429

            deadline = time.monotonic() + 5
            while not await refused():
                assert time.monotonic() < deadline, "the lower limit did not reach the relay"
    finally:
        await admin.aclose()


async def test_a_speech_key_rotation_reaches_a_relay_on_a_redis_cluster(
    cluster_uri: str, cluster_stack: Stack
) -> None:
    """Both of Azure's keys are valid during a rotation, so no 401 tells the relay: only the
    rotation's event does (`keys rotate-speech` publishes it). On a cluster it once never came."""
    from speechgate.core.speechkeys import SPEECH_KEY_SECRET

    stack = cluster_stack
    loose = {"client": "1000/minute", "subject": "1000/minute", "ip": "1000/minute"}
    client = await asyncio.to_thread(stack.service.add_client, rate_limits=loose)
    ready = f"http://127.0.0.1:{stack.relay.port}/readyz"
    assert await asyncio.to_thread(
        wait_until, lambda: httpx.get(ready).json()["checks"].get("events") == "ok", 20
    )
    url = f"{stack.relay.url}/v1/listen?language=en-US&access_token="

    async def key_of_a_new_stream() -> str:
        async with ws_connect(url + await asyncio.to_thread(stack.token, client)) as ws:
            await ws.send('{"type": "end"}')
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass
        key: str = stack.fake.handshakes[-1]["headers"]["Ocp-Apim-Subscription-Key"]
        return key

    old_key = await key_of_a_new_stream()  # the relay now holds the first key
    new_key = "e" * 32
    stack.fake.extra_keys.add(new_key)
    await stack.service.store.set(SPEECH_KEY_SECRET, new_key, tags={"slot": "key2"})
    admin = connect(cluster_uri)
    try:
        await publish(
            admin, Keyspace(stack.service.settings.redis_prefix), {"type": "reload", "what": "speech-key"}
        )
    finally:
        await admin.aclose()
    deadline = time.monotonic() + 5
    while (key := await key_of_a_new_stream()) == old_key:
        assert time.monotonic() < deadline, "the rotation did not reach the relay"
    assert key == new_key


def test_a_burst_of_calls_holds_a_bounded_set_of_connections(tmp_path: Path) -> None:
    """A burst of handshakes once left a relay 95 idle Redis connections, and a larger one would
    have opened as many as it had calls in flight (one per call of each script, up to 100 more in
    the client's pool, beyond which its commands failed), every one kept. What a process holds, in
    use or idle, is bounded (docs/operations.md budgets Redis' maxclients from it), and no call
    fails for it."""
    from speechgate.core.redisconn import MAX_PER_PROCESS, ScriptRunner

    server = RedisServer(tmp_path)
    server.start()
    name = f"sgtest-burst-{random.randrange(10**6)}"

    def held() -> int:
        with server.client() as admin:
            return sum(1 for c in admin.client_list() if c["name"] == name)

    async def run() -> tuple[int, int]:
        client = connect(server.url, name)
        scripts = [ScriptRunner(client, f"return {n}") for n in range(3)]  # as a relay has three
        most = 0

        async def watch(stop: asyncio.Event) -> None:
            nonlocal most
            while not stop.is_set():
                most = max(most, await asyncio.to_thread(held))

        stop = asyncio.Event()
        watcher = asyncio.ensure_future(watch(stop))
        try:
            for _ in range(5):
                calls = [script([], []) for script in scripts for _ in range(200)]
                commands = [client.incr(f"{name}:n") for _ in range(200)]
                answers = await asyncio.gather(*calls, *commands)
                assert answers[:600] == [n for n in range(3) for _ in range(200)]
                most = max(most, await asyncio.to_thread(held))
        finally:
            stop.set()
            await watcher
        after = await asyncio.to_thread(held)
        for script in scripts:
            await script.aclose()
        await client.aclose()
        return most, after

    try:
        most, after = asyncio.run(run())
    finally:
        server.stop()
    assert most <= MAX_PER_PROCESS
    assert after <= MAX_PER_PROCESS
