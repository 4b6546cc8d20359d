"""Benchmark: what routing over an upstream pool adds to a stream's handshake.

Two `speechgate relay` processes on the relay core, alike but for their store: one with no pool
(the configured upstream, as before the pool), one with a pool of three upstreams (all the echo
upstream, limits far above the load). The same load goes to each in turn, interleaved: C clients
each opening a stream on the Azure door and closing it at once, for `--seconds`. Per target:
handshakes per second, handshake p50/p99 (from the TCP connect to the 101), and Redis script calls
(EVALSHA) per stream, read from Redis' own `INFO commandstats`: the admission and the route are one
script call each, so the pool's cost in round trips is counted, not guessed (the heartbeat's
scripts, a handful per second, are in the count too).

    uv run python -m bench.handshake_routing [--clients 8] [--seconds 5] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import redis as sync_redis
from websockets.asyncio.client import connect

from bench.relay_latency import PATH, RELAY_CORE, cpu_times, percentile, stack, steal_share
from speechgate.core.filestore import FileStore
from speechgate.core.upstreams import Upstream, key_secret, save_pool
from tests.support.processes import free_port


async def hammer(url: str, token: str, clients: int, seconds: float) -> list[float]:
    """Handshake times (s) of `clients` loops opening and closing streams for `seconds`."""
    times: list[float] = []
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            headers = {"Authorization": f"Bearer {token}"}
            async with connect(url, additional_headers=headers, compression=None, open_timeout=10) as ws:
                times.append(time.perf_counter() - started)
                await ws.close()

    await asyncio.gather(*(loop() for _ in range(clients)))
    return times


def script_calls(client: sync_redis.Redis) -> int:
    """Script calls so far: each is one round trip (the commands a script runs are counted apart
    in commandstats, so the total of all commands would not be)."""
    stats = client.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, stack(Path(tmp)) as bench:
        pooled_store = Path(tmp) / "pooled"
        shutil.copytree(bench.env["SPEECHGATE_STORE_DIR"], pooled_store)
        store = FileStore(pooled_store)
        echo = f"ws://127.0.0.1:{bench.echo_port}"
        pool = [Upstream(f"up{n}", 10**5, endpoint=echo) for n in range(3)]

        async def fill() -> None:
            for upstream in pool:
                await store.set(key_secret(upstream.name), "0" * 32, tags={"slot": "key1"})
            await save_pool(store, pool, "bench")

        asyncio.run(fill())
        targets = {"no pool": bench.env["SPEECHGATE_STORE_DIR"], "pool of 3": str(pooled_store)}
        ports = {name: free_port() for name in targets}
        relays = {}
        redis = sync_redis.Redis.from_url(bench.env["REDIS_URL"])
        with contextlib.ExitStack() as running:
            for name, store_dir in targets.items():
                relay = bench.relay_process(ports[name], splice=True)
                assert relay.env is not None
                relay.env["SPEECHGATE_STORE_DIR"] = store_dir
                relays[name] = running.enter_context(relay)
            results: dict[str, list[tuple[float, float, float, float, float]]] = {n: [] for n in targets}
            for run in range(args.runs + 1):  # the first round warms both up and is not counted
                for name in targets:
                    url = f"ws://127.0.0.1:{ports[name]}{PATH}"
                    calls, cpu = script_calls(redis), cpu_times(RELAY_CORE)
                    times = asyncio.run(hammer(url, bench.token, args.clients, args.seconds))
                    steal = steal_share(cpu, cpu_times(RELAY_CORE))
                    per = (script_calls(redis) - calls) / len(times)
                    figures = (
                        len(times) / args.seconds,
                        percentile(times, 0.5) * 1000,
                        percentile(times, 0.99) * 1000,
                        per,
                        steal,
                    )
                    if run:
                        results[name].append(figures)
                        rate, p50, p99, scripts, _ = figures
                        print(
                            f"run {run} {name:>9}: {rate:6.0f} handshakes/s, p50 {p50:.2f} ms, "
                            f"p99 {p99:.2f} ms, {scripts:.2f} Redis scripts each, steal {steal:.0%}",
                            flush=True,
                        )
        medians = {
            name: [statistics.median(f[i] for f in rows) for i in range(5)] for name, rows in results.items()
        }
        base, pooled = medians["no pool"], medians["pool of 3"]
        print(
            f"median: pool of 3 against no pool: {pooled[0] / base[0]:.2f}x the handshakes/s, "
            f"p50 {pooled[1] / base[1]:.2f}x, p99 {pooled[2] / base[2]:.2f}x; "
            f"Redis script calls per stream {base[3]:.2f} -> {pooled[3]:.2f} "
            f"(steal {base[4]:.0%}/{pooled[4]:.0%})"
        )


if __name__ == "__main__":
    main()
