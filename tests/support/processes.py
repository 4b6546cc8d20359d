"""Processes the tests start and stop themselves: a private redis-server, token-service workers."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import redis


def free_port() -> int:
    """A port for a child process to listen on. Not one the kernel hands out itself: between
    this check and the child's bind, any outgoing connection of the suite could take a port of
    the ephemeral range (seen in CI: "address already in use"). Below that range, only another
    test picking the same random port could."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low <= 11_000:  # no room below the ephemeral range: let the kernel pick
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    for _ in range(100):
        port = random.randrange(10_000, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 10000 and {low}")


class Process:
    """A child process whose output is watched for a line that says it is ready."""

    def __init__(
        self,
        args: Sequence[str],
        ready_line: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        process_group: bool = False,
    ) -> None:
        """`process_group`: the child leads a group of its own, as a terminal's foreground job
        does, so that a test can signal it and its children at once (os.killpg), as Ctrl-C does."""
        self.process_group = process_group
        self.args = list(args)
        self.ready_line = ready_line
        self.env = env
        self.cwd = cwd
        self.output: list[str] = []
        self._ready = threading.Event()
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30.0) -> Process:
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            cwd=self.cwd,
            start_new_session=self.process_group,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"{self.args[0]} did not become ready:\n" + "".join(self.output))
        return self

    def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if self.ready_line in line:
                self._ready.set()
        self._ready.set()  # exited: start() sees poll() is not None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Process:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RedisServer:
    """A redis-server of the test's own on a free port, which the test may stop and start again."""

    def __init__(self, workdir: Path, cpus: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; .ci/run installs it")
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.pin = ["taskset", "-c", cpus] if cpus else []  # benchmarks pin it to a core
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        self.process = Process(args, "Ready to accept connections").start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)


def token_service_process(port: int, env: dict[str, str]) -> Process:
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "speechgate.token_service.app:app_from_env",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "1",
    ]
    return Process(args, "Application startup complete", env={**os.environ, **env})


def wait_until(predicate: object, timeout: float = 15.0, interval: float = 0.05) -> bool:
    """Poll a condition that changes with time (a background probe), up to `timeout` seconds."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@contextlib.contextmanager
def frozen_speech_service() -> Iterator[tuple[Process, str]]:
    """The fake Azure Speech service (tests/fakes/speech.py) as a process of its own, which a test
    may stop with SIGSTOP, as a hung resource; and its URL. Let go on (SIGCONT), then stopped."""
    port = free_port()
    fake = Process(
        [sys.executable, "-m", "tests.fakes.speech", "127.0.0.1", str(port)],
        "fake speech listening",
        cwd=Path(__file__).parent.parent.parent,
    ).start()
    try:
        yield fake, f"ws://127.0.0.1:{port}"
    finally:
        if fake.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(fake.proc.pid, signal.SIGCONT)
        fake.stop()
