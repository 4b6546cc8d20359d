"""Benchmark: how long one heartbeat script holds Redis, at 100, 1,000 and 5,000 streams of one
client, in chunks (what the relay does: speechgate/relay/sessions.py, BEAT_CHUNK) and as a
single call (what it did), in the same run.

While a script runs, Redis serves no one else: every token's rate limit and every handshake's
admission waits. Redis's own timing of each call (SLOWLOG, threshold 0) is read, so the figures
are Redis's time, not the client's or the network's (calls under 100 µs are not logged: none of
these is that short).

    uv run python -m bench.beat_cost [--streams 100,1000,5000] [--beats 10]

Needs redis-server; it starts a Redis of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from speechgate.core.clients import ClientPolicy
from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import connect
from speechgate.relay.sessions import BEAT_CHUNK, RedisSessions, Stream
from tests.support.claims import access_claims
from tests.support.processes import RedisServer

POLICY = ClientPolicy(client_id="app", secret_hash="x")  # noqa: S106 (no secret: never checked)


async def beat_times(url: str, streams: int, chunk: int, beats: int) -> tuple[list[float], float]:
    """Microseconds each beat script took in Redis, and the calls per beat."""
    client = connect(url)
    sessions = RedisSessions(client, Keyspace(f"bench:{streams}:{chunk}:"), 15, chunk=chunk)
    live = []
    for n in range(streams):
        stream = Stream(access_claims(sub=f"user{n % 50}", jti=f"j{n}"), f"j{n}.0", 0)
        stream.add_audio(32_000)
        live.append(stream)
    await sessions.heartbeat(live, {"app": POLICY})  # the hashes and leases exist, as in a steady state
    await client.execute_command("SLOWLOG", "RESET")
    for _ in range(beats):
        for stream in live:
            stream.add_audio(3_200)
        await sessions.heartbeat(live, {"app": POLICY})
    entries = await client.execute_command("SLOWLOG", "GET", 100_000)
    await client.aclose()
    times = [float(duration) for _, _, duration, command, *_ in entries if _name(command) in SCRIPT_CALLS]
    return times, len(times) / beats


SCRIPT_CALLS = {"evalsha", "eval"}


def _name(command: list[bytes | str]) -> str:
    first = command[0] if command else b""
    return (first.decode() if isinstance(first, bytes) else str(first)).lower()


async def run(streams: list[int], beats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp), cpus="1") as server:
        admin = connect(server.url)
        # Only what takes over 100 µs: the scripts (a stream's share is ~10 µs), not the commands
        # inside them, which SLOWLOG logs too and would crowd out.
        await admin.execute_command("CONFIG", "SET", "slowlog-log-slower-than", 100)
        await admin.execute_command("CONFIG", "SET", "slowlog-max-len", 100_000)
        await admin.aclose()
        print(f"Redis time per heartbeat script call (µs, SLOWLOG), {beats} beats each:")
        columns = ("streams", "calls/beat", "chunked p50", "chunked max", "one call p50", "one call max")
        print(" ".join(f"{name:>12}" for name in columns))
        for n in streams:
            chunked, calls = await beat_times(server.url, n, BEAT_CHUNK, beats)
            single, _ = await beat_times(server.url, n, n, beats)
            figures = (
                n,
                calls,
                statistics.median(chunked),
                max(chunked),
                statistics.median(single),
                max(single),
            )
            print(" ".join(f"{value:>12.0f}" for value in figures))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", default="100,1000,5000")
    parser.add_argument("--beats", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(run([int(n) for n in args.streams.split(",")], args.beats))


if __name__ == "__main__":
    main()
