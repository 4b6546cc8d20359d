"""Benchmark: tokens per second from one token-service worker, against a trivial endpoint.

All servers run under the same uvicorn settings (one worker, uvloop, no access log) pinned to one
core; wrk loads them from the other core. The token endpoint runs twice: on the bounded HTTP
protocol production uses (speechgate/token_service/http.py) and on uvicorn's plain httptools ("plain"), so
the bounds' cost is measured in the same run; the trivial endpoint runs on plain httptools. The
token endpoint does the full work: form parsing, client authentication (HMAC), three rate limits
in Redis, an ES256 signature.

    uv run python -m bench.token_throughput [--duration 10] [--connections 4,16] [--runs 3]

Needs wrk (Debian package `wrk`) and redis-server; it starts a Redis of its own.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from speechgate.core.filestore import FileStore
from tests.support.processes import Process, RedisServer, free_port
from tests.support.services import add_client, prepared_store

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = "grant_type=client_credentials&subject=bench-user"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic {auth}"
"""


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, script: Path, connections: int, duration: int, cpu: str) -> Result:
    args = [
        "taskset",
        "-c",
        cpu,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Result(rps, p50, p99, int(errors.group(1)) if errors else 0)


def server(target: str, port: int, env: dict[str, str], cpu: str, factory: bool, http: str) -> Process:
    args = ["taskset", "-c", cpu, sys.executable, "-m", "bench.serve", target, str(port), "--http", http]
    if factory:
        args.append("--factory")
    return Process(args, "Uvicorn running on", env={**os.environ, **env})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", default="4,16")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        sys.exit("needs wrk and taskset: apt-get install wrk util-linux")
    with tempfile.TemporaryDirectory() as tmp:
        # A Redis of our own, pinned beside the load generator, so the server's core is its own.
        redis_server = RedisServer(Path(tmp), cpus="1")
        redis_url = redis_server.url
        store, hash_key = prepared_store(FileStore(Path(tmp) / "store"))
        unlimited = {"client": "100000000/minute", "subject": "100000000/minute", "ip": "100000000/minute"}
        client_id, secret = add_client(store, hash_key, "bench-client", rate_limits=unlimited)
        script = Path(tmp) / "token.lua"
        auth = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        script.write_text(WRK_SCRIPT.format(auth=auth))
        env = {
            "SPEECHGATE_STORE_DIR": str(Path(tmp) / "store"),
            "REDIS_URL": redis_url,
            "SPEECHGATE_REDIS_PREFIX": "sgbench:",
        }
        token_port, plain_port, trivial_port = free_port(), free_port(), free_port()
        token_url = f"http://127.0.0.1:{token_port}/v1/token"
        plain_url = f"http://127.0.0.1:{plain_port}/v1/token"
        trivial_url = f"http://127.0.0.1:{trivial_port}/"
        with (
            redis_server,
            server("speechgate.token_service.app:app_from_env", token_port, env, "0", True, "bounded"),
            server("speechgate.token_service.app:app_from_env", plain_port, env, "0", True, "httptools"),
            server("bench.trivial_app:app", trivial_port, env, "0", False, "httptools"),
        ):
            check = httpx.post(
                token_url,
                auth=(client_id, secret),
                data={"grant_type": "client_credentials", "subject": "bench-user"},
            )
            assert check.status_code == 200, check.text
            for url in (token_url, plain_url, trivial_url):  # warm-up
                wrk(url, script, 4, 2, "1")
            print(f"{'conns':>5} {'endpoint':>8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>7}")
            for connections in (int(c) for c in args.connections.split(",")):
                tokens, plains, trivials = [], [], []
                for _ in range(args.runs):  # interleaved, so all see the same machine noise
                    tokens.append(wrk(token_url, script, connections, args.duration, "1"))
                    plains.append(wrk(plain_url, script, connections, args.duration, "1"))
                    trivials.append(wrk(trivial_url, script, connections, args.duration, "1"))
                for name, results in (("token", tokens), ("plain", plains), ("trivial", trivials)):
                    for r in results:
                        print(
                            f"{connections:>5} {name:>8} {r.rps:>8.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} "
                            f"{r.errors:>7}"
                        )
                ratios = [t.rps / b.rps for t, b in zip(tokens, trivials, strict=True)]
                bounds = [t.rps / p.rps for t, p in zip(tokens, plains, strict=True)]
                print(
                    f"  c={connections}: the bounded protocol against uvicorn's plain httptools, median "
                    f"{statistics.median(bounds):.3f} (runs: {', '.join(f'{r:.3f}' for r in bounds)})"
                )
                print(
                    f"  c={connections}: tokens/s median {statistics.median(t.rps for t in tokens):.0f}, "
                    f"p99 median {statistics.median(t.p99_ms for t in tokens):.2f} ms, "
                    f"ratio to trivial median {statistics.median(ratios):.3f} "
                    f"(runs: {', '.join(f'{r:.3f}' for r in ratios)})"
                )


if __name__ == "__main__":
    main()
