"""`speechgate dev` on a fresh directory: the printed curl line gets a token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import jwt
import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.fakes.speech import KEY, FakeSpeech, FakeSpeechServer
from tests.support.cli import SPEECHGATE, credentials
from tests.support.processes import Process, free_port, wait_until
from tests.support.relays import make_wav


def dev(cwd: Path, *args: str, **env: str) -> Process:
    """`speechgate dev` on free ports; with no Redis configured it starts its own (`--no-redis`:
    none)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHGATE_") and k != "REDIS_URL"}
    return Process(
        [SPEECHGATE, "dev", "--port", str(free_port()), *args],
        "Uvicorn running on",
        env={"SPEECHGATE_RELAY_PORT": str(free_port()), **clean, **env},
        cwd=cwd,
    )


def run_curl_line(output: str) -> dict[str, object]:
    (line,) = [x.strip() for x in output.splitlines() if x.strip().startswith("curl ")]
    result = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30, check=True)
    body: dict[str, object] = json.loads(result.stdout)
    return body


def test_dev_prints_a_curl_line_that_gets_a_token(tmp_path: Path) -> None:
    with dev(tmp_path, "--no-redis") as first:
        output = "".join(first.output)
        body = run_curl_line(output)
    assert body["token_type"] == "Bearer"
    assert "in-memory" in output
    assert (tmp_path / ".speechgate" / "secrets").is_dir()
    with dev(tmp_path, "--no-redis") as second:  # a restart keeps the same credentials
        assert credentials("".join(second.output)) == credentials(output)
        assert run_curl_line("".join(second.output))["token_type"] == "Bearer"


def test_dev_client_credentials_can_be_fixed_by_environment(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    secret = "s3cret-for-the-demo-0123456789abcdef"
    with dev(
        tmp_path,
        SPEECHGATE_DEV_CLIENT_ID="demo-app",
        SPEECHGATE_DEV_CLIENT_SECRET=secret,
        REDIS_URL=redis_url,
        SPEECHGATE_REDIS_PREFIX=prefix,  # deleted afterwards: nothing left in a developer's Redis
    ) as proc:
        output = "".join(proc.output)
        assert credentials(output) == ("demo-app", secret)
        assert f"Redis at {redis_url}" in output
        assert run_curl_line(output)["scope"] == "speech:recognize speech:synthesize speech:translate"


def test_bad_setting_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [SPEECHGATE, "dev"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={**os.environ, "SPEECHGATE_PORT": "eighty"},
        check=False,
    )
    assert result.returncode == 5  # cannot start
    assert "SPEECHGATE_PORT='eighty' is not a whole number (e.g. SPEECHGATE_PORT=8000)" in result.stderr
    assert "Traceback" not in result.stderr


def test_token_service_without_signing_key_says_how_to_fix_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [SPEECHGATE, "token-service"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={**os.environ, "SPEECHGATE_STORE_DIR": str(tmp_path / "empty")},
        check=False,
    )
    assert result.returncode == 5  # cannot start
    assert "no enabled signing key" in result.stderr
    assert "speechgate keys rotate-signing" in result.stderr
    assert "Traceback" not in result.stderr


def test_dev_runs_the_relay_beside_the_token_service(tmp_path: Path) -> None:
    relay_port = free_port()
    gone = f"ws://127.0.0.1:{free_port()}"  # a configured upstream replaces the offline recognizer
    with dev(
        tmp_path,
        SPEECHGATE_RELAY_PORT=str(relay_port),
        SPEECHGATE_SPEECH_ENDPOINT=gone,
        SPEECH_KEY=KEY,
        SPEECHGATE_UPSTREAM_CONNECT_ATTEMPTS="1",
    ) as proc:
        output = "".join(proc.output)
        assert f"ws://127.0.0.1:{relay_port}" in output
        assert f"upstream        {gone}" in output
        assert "OFFLINE" not in output
        token = str(run_curl_line(output)["access_token"])

        async def attempt(headers: dict[str, str]) -> int | None:
            url = f"ws://127.0.0.1:{relay_port}/v1/listen?language=en-US"
            try:
                async with connect(url, additional_headers=headers) as ws:
                    await ws.recv()
            except InvalidStatus as exc:
                return exc.response.status_code
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else None
            return None

        assert asyncio.run(attempt({})) == 401  # refused before the upgrade
        # Admitted, then told clearly that Azure Speech cannot be reached.
        assert asyncio.run(attempt({"Authorization": f"Bearer {token}"})) == 1013


def test_relay_command_drains_and_exits_on_sigterm(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "SPEECHGATE_STORE_DIR": str(tmp_path)}
    proc = Process([SPEECHGATE, "relay", "--port", str(port)], "relay listening", env=env).start()
    assert proc.proc is not None
    assert httpx.get(f"http://127.0.0.1:{port}/demo").status_code == 404  # the demo is for dev only
    # Which Opus decoder it found, for the operator: libopus, from PyAV's wheels.
    assert "Opus is decoded with libopus 1." in "".join(proc.output)
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(15) == 0


def test_dev_without_redis_closes_a_revoked_stream_and_refuses_its_token(tmp_path: Path) -> None:
    relay_port = free_port()
    with (
        FakeSpeechServer(FakeSpeech()) as speech,
        dev(
            tmp_path,
            "--no-redis",
            SPEECHGATE_RELAY_PORT=str(relay_port),
            SPEECHGATE_SPEECH_ENDPOINT=speech.url,
            SPEECH_KEY=KEY,
        ) as proc,
    ):
        output = "".join(proc.output)
        client = credentials(output)
        token = str(run_curl_line(output)["access_token"])
        token_url = re.search(r"token service\s+(\S+)", output)
        assert token_url is not None
        listen = f"ws://127.0.0.1:{relay_port}/v1/listen?language=en-US"
        headers = {"Authorization": f"Bearer {token}"}

        async def scenario() -> tuple[int | None, int | None]:
            async with connect(listen, additional_headers=headers) as ws:
                await ws.send(b"\0" * 3200)
                revoked = await asyncio.to_thread(
                    httpx.post, f"{token_url.group(1)}/v1/revoke", auth=client, data={"token": token}
                )
                assert revoked.status_code == 200

                async def drained() -> None:
                    with contextlib.suppress(ConnectionClosed):
                        async for _ in ws:
                            pass

                await asyncio.wait_for(drained(), 10)  # closed at once, or the test fails here
                closed = ws.close_code
            try:
                async with connect(listen, additional_headers=headers):
                    return closed, None
            except InvalidStatus as exc:
                return closed, exc.response.status_code

        assert asyncio.run(scenario()) == (1008, 401)


def test_dev_on_other_ports_advertises_the_urls_it_bound(tmp_path: Path) -> None:
    """Tokens, metadata, OpenAPI and the banner name the ports dev listens on, and the banner's
    second-terminal command works as printed."""
    port, relay_port = free_port(), free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHGATE_") and k != "REDIS_URL"}
    args = [SPEECHGATE, "dev", "--no-redis", "--port", str(port), "--relay-port", str(relay_port)]
    with Process(args, "Uvicorn running on", env=clean, cwd=tmp_path) as proc:
        output = "".join(proc.output)
        issuer, relay = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{relay_port}"
        assert re.search(rf"token service\s+{issuer}\n", output)
        assert re.search(rf"relay\s+{relay}\n", output)
        body = run_curl_line(output)
        assert body["relay_url"] == relay
        assert jwt.decode(str(body["access_token"]), options={"verify_signature": False})["iss"] == issuer
        metadata = httpx.get(f"{issuer}/.well-known/oauth-authorization-server").json()
        assert metadata["issuer"] == issuer
        assert metadata["token_endpoint"] == f"{issuer}/v1/token"
        assert httpx.get(f"{issuer}/openapi.json").json()["servers"] == [{"url": issuer}]
        (command,) = [x.strip() for x in output.splitlines() if "speechgate stream" in x]
        assert f"--token-url {issuer} --relay-url {relay}" in command
        wav = make_wav(tmp_path / "speech.wav", 1.0)
        assert command.startswith("speechgate stream")  # no checkout here: the installed command
        line = command.replace("speechgate", SPEECHGATE, 1).replace("some.wav", str(wav)) + " --fast"
        streamed = subprocess.run(
            ["bash", "-c", line], capture_output=True, text=True, cwd=tmp_path, env=clean, timeout=60
        )
        assert streamed.returncode == 0, streamed.stderr
        assert "1.0 s of audio" in streamed.stderr


@pytest.mark.parametrize("busy", ["--port", "--relay-port"])
def test_a_busy_port_is_one_line_and_exit_5_before_anything_is_printed(tmp_path: Path, busy: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        ports = {"--port": str(free_port()), "--relay-port": str(free_port()), busy: str(port)}
        result = subprocess.run(
            [SPEECHGATE, "dev", "--no-redis", *[x for kv in ports.items() for x in kv]],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
    assert result.returncode == 5
    assert result.stdout == ""  # no banner
    (line,) = result.stderr.strip().splitlines()
    option = "--port or SPEECHGATE_PORT" if busy == "--port" else "--relay-port or SPEECHGATE_RELAY_PORT"
    expected = f"Error: cannot listen on 127.0.0.1:{port}: Address already in use; "
    assert line == expected + f"choose another port with {option}"


@pytest.mark.parametrize("client_id", ["c", "my app", "a/b", "Ünïcode-app", "a" * 200, "My-App"])
def test_an_invalid_dev_client_id_is_one_line_and_exit_5(tmp_path: Path, client_id: str) -> None:
    """Ids the client rules refuse once reached the store first: a 45-line traceback, exit 1."""
    result = subprocess.run(
        [SPEECHGATE, "dev", "--no-redis", "--port", str(free_port()), "--relay-port", str(free_port())],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
        env={**os.environ, "SPEECHGATE_DEV_CLIENT_ID": client_id},
    )
    assert result.returncode == 5, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "SPEECHGATE_DEV_CLIENT_ID" in result.stderr
    assert "e.g. SPEECHGATE_DEV_CLIENT_ID=my-app" in result.stderr


def test_dev_runs_a_private_redis_that_the_security_and_sre_commands_find(tmp_path: Path) -> None:
    """Without REDIS_URL and with redis-server installed, dev starts a Redis of its own in its
    state directory; `tokens revoke`, `keys revoke-signing` and `quotas top` work against it,
    run from the same directory; it stops with dev."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHGATE_") and k != "REDIS_URL"}
    with dev(tmp_path) as proc:
        output = "".join(proc.output)
        found = re.search(r"Redis of its own at (redis://127\.0\.0\.1:(\d+)/0)", output)
        assert found is not None, output
        client_id, _ = credentials(output)
        token = str(run_curl_line(output)["access_token"])

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [SPEECHGATE, *args], capture_output=True, text=True, cwd=tmp_path, env=clean, timeout=60
            )

        revoked = cli("tokens", "revoke", "--client", client_id, "--yes")
        assert revoked.returncode == 0, revoked.stderr
        top = cli("quotas", "top", "--json")
        assert top.returncode == 0, top.stderr
        assert [row["client_id"] for row in json.loads(top.stdout)] == [client_id]
        kid = jwt.get_unverified_header(token)["kid"]
        leaked = cli("keys", "revoke-signing", "--kid", kid, "--yes")
        assert leaked.returncode == 0, leaked.stderr
        assert redis.Redis.from_url(found.group(1)).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(found.group(1), socket_connect_timeout=1).ping()
    assert (tmp_path / ".speechgate" / "redis").is_dir()
    assert not (tmp_path / ".speechgate" / "dev.json").exists()  # no stale state for other commands


def test_dev_killed_outright_takes_its_private_redis_with_it(tmp_path: Path) -> None:
    proc = dev(tmp_path).start()
    found = re.search(r"Redis of its own at (redis://\S+)", "".join(proc.output))
    assert found is not None
    assert proc.proc is not None
    proc.proc.kill()  # SIGKILL: no cleanup of dev's own runs
    proc.proc.wait(10)

    def gone() -> bool:
        try:
            redis.Redis.from_url(found.group(1), socket_connect_timeout=1).ping()
        except redis.ConnectionError:
            return True
        return False

    assert wait_until(gone, timeout=10)


def test_dev_stops_its_private_redis_even_when_it_cannot_save(tmp_path: Path) -> None:
    """redis-server answers SIGTERM by saving, and will not exit when it cannot (its directory
    gone): dev stops it anyway."""
    with dev(tmp_path) as proc:
        found = re.search(r"Redis of its own at (redis://\S+)", "".join(proc.output))
        assert found is not None
        redis.Redis.from_url(found.group(1)).set("k", "v")  # something to save
        shutil.rmtree(tmp_path / ".speechgate" / "redis")
        assert proc.proc is not None
        proc.proc.terminate()
        assert proc.proc.wait(15) == 0  # dev itself ended cleanly, its cleanup included
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(found.group(1), socket_connect_timeout=1).ping()


def test_a_second_dev_on_the_same_store_is_refused_and_the_first_keeps_working(tmp_path: Path) -> None:
    """A second `speechgate dev` in the same directory once started without a word, ran a second
    Redis on the same data folder and, when it stopped, removed the first's dev.json: the first's
    CLI then could not find its Redis. It is refused in one line naming the first; the first runs on."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHGATE_") and k != "REDIS_URL"}
    with dev(tmp_path) as first:
        assert first.proc is not None
        second = subprocess.run(
            [SPEECHGATE, "dev", "--port", str(free_port()), "--relay-port", str(free_port())],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=clean,
            timeout=60,
            check=False,
        )
        assert second.returncode == 5, second.stderr
        (line,) = second.stderr.strip().splitlines()
        assert f"already running on .speechgate (PID {first.proc.pid}, token service http://" in line
        assert "SPEECHGATE_STORE_DIR" in line
        assert (tmp_path / ".speechgate" / "dev.json").exists()
        top = subprocess.run(
            [SPEECHGATE, "quotas", "top", "--json"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=clean,
            timeout=60,
        )
        assert top.returncode == 0, top.stderr  # the first's CLI still finds its Redis


ROOT = Path(__file__).resolve().parents[1]


def test_the_tours_second_terminal_works_in_a_new_shell_without_uv_on_its_path(tmp_path: Path) -> None:
    """script/dev installs uv into ~/.local/bin, which a new shell may not have on its PATH: the
    README's second-terminal command (`uv run speechgate stream …`) once answered "uv: command not
    found". The tour now uses script/speechgate, which finds uv itself."""
    uv = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    bare = os.pathsep.join(d for d in ("/usr/local/bin", "/usr/bin", "/bin") if not (Path(d) / "uv").exists())
    fresh = {k: v for k, v in os.environ.items() if not k.startswith(("SPEECHGATE_", "VIRTUAL_ENV", "UV_"))}
    fresh = {**{k: v for k, v in fresh.items() if k != "REDIS_URL"}, "PATH": bare}
    assert subprocess.run(["bash", "-c", "command -v uv"], env=fresh, capture_output=True).returncode != 0
    assert Path(uv).exists()
    with dev(tmp_path, "--no-redis"):
        streamed = subprocess.run(
            [
                str(ROOT / "script" / "speechgate"),
                "stream",
                str(ROOT / "tests" / "data" / "speech.wav"),
                "--fast",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,  # the directory dev runs in: the command finds it there
            env=fresh,
            timeout=300,
        )
    assert streamed.returncode == 0, streamed.stderr
    assert "s of audio" in streamed.stderr


def test_ctrl_c_stops_dev_quietly_with_exit_0(tmp_path: Path) -> None:
    """Ctrl-C reaches the terminal's whole foreground group: the private Redis died with dev's
    services still up (two connection warnings on the way out), then "Aborted!" and exit 1."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHGATE_") and k != "REDIS_URL"}
    proc = Process(
        [SPEECHGATE, "dev", "--port", str(free_port())],
        "Uvicorn running on",
        env={"SPEECHGATE_RELAY_PORT": str(free_port()), **clean},
        cwd=tmp_path,
        process_group=True,
    )
    with proc:
        assert proc.proc is not None
        found = re.search(r"Redis of its own at (redis://\S+)", "".join(proc.output))
        assert found is not None
        before = len(proc.output)
        os.killpg(proc.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert proc.proc.wait(20) == 0
    after = "".join(proc.output[before:])
    assert "Aborted" not in after
    assert "WARNING" not in after, after
    assert "ERROR" not in after, after
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(found.group(1), socket_connect_timeout=1).ping()
    assert not (tmp_path / ".speechgate" / "dev.json").exists()
