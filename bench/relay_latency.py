"""Benchmark: per-frame round trip through the relay, against the same load sent direct.

N streams of 3,200-byte USP audio frames every 100 ms (real time) to a fake Azure that answers
each frame at once; in the same run, the same load straight to that fake is the baseline. The
relay runs as `speechgate relay` with authentication, metering and quota heartbeats on, pinned to
one core; the load, the fake, Redis and the token service share the other.

    uv run python -m bench.relay_latency [--streams 100,300,600,1000] [--seconds 8] [--runs 3] [--splice-off]

Prints, per N: p50/p99 direct and through the relay, the added p99, the relay's CPU (share of
one core), lost frames; then the largest N whose added p99 stays under 50 ms, and the memory per
stream of a fresh relay (and a fresh prototype) at the largest N. Two more targets on the relay's
core, in the same runs: the forward-only prototype (bench/forwarder.py) (a relay on `websockets` that
neither authenticates nor meters, bench/forwarder.py), against which the issue's goals were set,
and with `--splice-off` the relay forwarding through websockets' message API
(SPEECHGATE_SPLICE=0), the splice's own baseline. Each N is run `--runs` times, the targets
interleaved, after a warm-up; the figures are medians (this machine is shared and noisy). Beside
each run's added p99: the share of the relay core's time the hypervisor gave to other guests
(steal), when nothing on that core could run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.token_throughput import server
from speechgate.core.filestore import FileStore
from tests.support.processes import Process, RedisServer, free_port
from tests.support.services import add_client, prepared_store

PATH = "/speech/recognition/conversation/cognitiveservices/v1?language=en-US"
TICKS = os.sysconf("SC_CLK_TCK")
RELAY_CORE = 1  # the relays (and the prototype) run pinned to it
LOAD_CORE = 0  # the load, the fake upstream, Redis and the token service


def on_core(core: int) -> list[str]:
    return ["taskset", "-c", str(core)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_times(core: int) -> list[int]:
    """This core's /proc/stat counters: user nice system idle iowait irq softirq steal ..."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            return [int(field) for field in line.split()[1:]]
    return []


def steal_share(before: list[int], after: list[int]) -> float:
    """The share of the time the hypervisor gave this vCPU's turn to another guest."""
    deltas = [b - a for a, b in zip(before, after, strict=True)]
    return deltas[7] / max(1, sum(deltas[:8]))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_load(
    url: str, token: str, streams: int, seconds: float, relay_pid: int | None, script: Path | None = None
) -> dict[str, float]:
    extra = [str(script)] if script is not None else []
    load = subprocess.Popen(
        [
            *on_core(LOAD_CORE),
            sys.executable,
            "-m",
            "bench.load",
            url,
            token,
            str(streams),
            str(seconds),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert load.stderr is not None
    result: dict[str, float] = {}
    said = ""  # what the load wrote on stderr before the measured window
    if relay_pid is not None:
        rss_before = rss_kib(relay_pid)
        said = load.stderr.readline()  # every stream connected, or the load failed (reported below)
        time.sleep(1.0)  # streaming for half a second: the measured window is steady state
        cpu_start, t_start = cpu_seconds(relay_pid), time.monotonic()
        stat_start = cpu_times(RELAY_CORE)
        time.sleep(seconds / 2)
        result["steal"] = steal_share(stat_start, cpu_times(RELAY_CORE))
        result["rss_kib_per_stream"] = max(0, rss_kib(relay_pid) - rss_before) / streams
        result["cpu_share"] = (cpu_seconds(relay_pid) - cpu_start) / (time.monotonic() - t_start)
    out, err = load.communicate()
    if not out:
        print(said + err, file=sys.stderr)
        raise SystemExit(f"the load against {url.split('?')[0]} failed (see above)")
    output = json.loads(out)
    result.update(
        sent=output["sent"],
        answered=output["answered"],
        p50=percentile(output["rtts"], 0.50),
        p99=percentile(output["rtts"], 0.99),
    )
    return result


@dataclass
class Stack:
    """What the relay benchmarks run against: a client with no limits, its token, the echo upstream."""

    mint: Callable[[], str]  # a new token from the token service
    echo_port: int
    env: dict[str, str]
    _token: str = ""
    _minted: float = -1e9

    @property
    def token(self) -> str:
        """A token with minutes left: a run of several N outlasts one token's lifetime."""
        if time.monotonic() - self._minted > 60:
            self._token, self._minted = self.mint(), time.monotonic()
        return self._token

    def relay_process(self, port: int, splice: bool) -> Process:
        """`speechgate relay` pinned to the relay core (not started)."""
        command = [
            *on_core(RELAY_CORE),
            str(Path(sys.executable).parent / "speechgate"),
            "relay",
            "--port",
            str(port),
        ]
        env = {**os.environ, **self.env, "SPEECHGATE_SPLICE": "1" if splice else "0"}
        return Process(command, "relay listening", env=env)


@contextlib.contextmanager
def stack(tmp: Path) -> Iterator[Stack]:
    """Redis, the echo upstream and the token service on the load core; a token for the bench client."""
    store_dir = tmp / "store"
    store, hash_key = prepared_store(FileStore(store_dir))
    big = 10**9
    client_id, secret = add_client(
        store,
        hash_key,
        "bench-relay",
        rate_limits={"client": "", "subject": "", "ip": ""},
        max_streams_per_subject=big,
        max_streams_per_client=big,
        audio_s_per_day_subject=big,
        audio_s_per_day_client=big,
        max_session_s=86400,
    )
    redis_server = RedisServer(tmp, cpus=str(LOAD_CORE))
    token_port, echo_port = free_port(), free_port()
    env = {
        "SPEECHGATE_STORE_DIR": str(store_dir),
        "REDIS_URL": redis_server.url,
        "SPEECHGATE_REDIS_PREFIX": "sgbench:",
        "SPEECHGATE_SPEECH_ENDPOINT": f"ws://127.0.0.1:{echo_port}",
        "SPEECH_KEY": "0" * 32,
        "SPEECHGATE_JWKS_URL": f"http://127.0.0.1:{token_port}/.well-known/jwks.json",
    }
    echo = Process(
        [*on_core(LOAD_CORE), sys.executable, "-m", "bench.echo_upstream", str(echo_port)],
        "echo upstream ready",
    )
    token_service = server(
        "speechgate.token_service.app:app_from_env", token_port, env, str(LOAD_CORE), True, "bounded"
    )

    def mint() -> str:
        response = httpx.post(
            f"http://127.0.0.1:{token_port}/v1/token",
            auth=(client_id, secret),
            data={"grant_type": "client_credentials"},
        )
        token: str = response.json()["access_token"]
        return token

    with redis_server, echo, token_service:
        yield Stack(mint, echo_port, env)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", default="100,300,600,1000")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per N; medians are shown")
    parser.add_argument(
        "--splice-off",
        action="store_true",
        help="also the relay with SPEECHGATE_SPLICE=0, the splice's baseline",
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]

    with tempfile.TemporaryDirectory() as tmp, stack(Path(tmp)) as bench:
        relay_port, forwarder_port, messages_port = free_port(), free_port(), free_port()
        relay = bench.relay_process(relay_port, True)

        def forwarder_process(port: int) -> Process:
            command = [
                sys.executable,
                "-m",
                "bench.forwarder",
                str(port),
                f"ws://127.0.0.1:{bench.echo_port}",
            ]
            return Process([*on_core(RELAY_CORE), *command], "forwarder ready")

        # The relay as shipped (the Azure door spliced); the forward-only prototype (bench/forwarder.py);
        # with --splice-off, the same relay forwarding through websockets' message API.
        forwarder = forwarder_process(forwarder_port)
        messages = bench.relay_process(messages_port, False) if args.splice_off else contextlib.nullcontext()
        with relay, forwarder, messages:
            assert relay.proc is not None
            assert forwarder.proc is not None
            targets = {
                "direct": (f"ws://127.0.0.1:{bench.echo_port}{PATH}", None),
                "relay": (f"ws://127.0.0.1:{relay_port}{PATH}", relay.proc.pid),
                "forwarder": (f"ws://127.0.0.1:{forwarder_port}{PATH}", forwarder.proc.pid),
            }
            if isinstance(messages, Process):
                assert messages.proc is not None
                targets["splice off"] = (f"ws://127.0.0.1:{messages_port}{PATH}", messages.proc.pid)
            others = [name for name in targets if name not in ("direct", "relay")]
            for url, _ in targets.values():  # warm-up: first connections, JWKS, Redis pools
                run_load(url, bench.token, 50, 2.0, None)
            print(
                f"medians of {args.runs} interleaved runs of {args.seconds:g} s\n"
                f"{'N':>5} {'direct p50/p99 ms':>18} {'relay p50/p99 ms':>17} {'added p99':>9} "
                f"{'relay CPU':>9} {'lost':>6} |"
                + "".join(f" {name + ': added p99':>22} {'CPU':>5} |" for name in others)
                + " each run: relay / forwarder added p99 (relay core's steal)"
            )
            rows = []
            for n in counts:
                runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
                for _ in range(args.runs):
                    for name, (url, pid) in targets.items():
                        try:
                            runs[name].append(run_load(url, bench.token, n, args.seconds, pid))
                        except SystemExit:
                            print("".join(relay.output)[-3000:])
                            raise

                def med(name: str, key: str, runs: dict[str, list[dict[str, float]]] = runs) -> float:
                    return statistics.median(r[key] for r in runs[name])

                def added(name: str, runs: dict[str, list[dict[str, float]]] = runs) -> list[float]:
                    return [r["p99"] - d["p99"] for r, d in zip(runs[name], runs["direct"], strict=True)]

                each = added("relay")
                median_added = statistics.median(each)
                each_run = ", ".join(
                    f"{a:.1f} / {f:.1f} ({r['steal']:.0%})"
                    for a, f, r in zip(each, added("forwarder"), runs["relay"], strict=True)
                )
                lost = int(sum(r["sent"] - r["answered"] for r in runs["relay"]))
                rows.append((n, median_added, lost))
                print(
                    f"{n:>5} {med('direct', 'p50'):>8.2f} / {med('direct', 'p99'):>6.2f}  "
                    f"{med('relay', 'p50'):>7.2f} / {med('relay', 'p99'):>6.2f} {median_added:>9.2f} "
                    f"{med('relay', 'cpu_share'):>8.0%} "
                    f"{lost:>6} |"
                    + "".join(
                        f" {statistics.median(added(name)):>22.2f} {med(name, 'cpu_share'):>5.0%} |"
                        for name in others
                    )
                    + f" {each_run}",
                    flush=True,
                )
            fitting = [n for n, p99, lost in rows if p99 < 50 and lost == 0]
            largest = max(fitting) if fitting else "none"
            print(f"largest N with median added p99 < 50 ms and no frame lost: {largest}")

            # Memory in fresh processes: one that has served a load keeps its freed memory, so
            # growth measured later reads near zero.
            n = max(counts)
            fresh = {"relay": lambda port: bench.relay_process(port, True), "forwarder": forwarder_process}
            for name, make in fresh.items():
                port = free_port()
                with make(port) as process:
                    assert process.proc is not None
                    url = f"ws://127.0.0.1:{port}{PATH}"
                    growth = run_load(url, bench.token, n, 4.0, process.proc.pid)["rss_kib_per_stream"]
                print(f"memory, fresh {name} process, {n} streams (both legs): {growth:.1f} KiB per stream")


if __name__ == "__main__":
    main()
