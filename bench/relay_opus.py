"""Benchmark: Opus streams through the plain door against PCM streams, on one relay core.

N streams each send a 250-ms chunk every 250 ms (real time), the chunking the plain door's Opus
formats are made for, to `/v1/listen`: either 16 kHz PCM (8,000 bytes a chunk) or Ogg/Opus at
24 kbit/s (the test fixture's pages, a whole number of packets a chunk), encoded as a phone does
(at 16 kHz, 20-ms packets: SILK) or as Chromium's MediaRecorder does (at 48 kHz, 60-ms packets:
hybrid and CELT), which the relay decodes. The
fake Azure answers each audio message at once, and the relay turns each answer into a `partial`
event: a chunk's round trip is timed until it. The baseline in the same run: the same cadence of
8,000-byte USP audio messages straight to the fake.

    uv run python -m bench.relay_opus [--streams 100,300,600] [--seconds 8] [--runs 3]

Prints, per N: p50/p99 direct, through the relay with PCM and with Opus, the added p99 of each,
the relay's CPU (share of one core, its worker threads included) and lost chunks; the relay CPU per
Opus stream-second against a PCM stream-second; and the largest N of Opus streams with added p99
under 50 ms and no chunk lost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.relay_latency import run_load, stack
from speechgate.devtools.compress import BROWSER, PHONE, encode_opus
from speechgate.devtools.wav import read_pcm16k
from speechgate.relay import usp
from speechgate.relay.containers import ogg_pages
from tests.support.processes import free_port

FIXTURE = Path(__file__).parent.parent / "tests" / "data" / "speech.wav"
CHUNK_S = 0.25
SOURCES = {"phone": PHONE, "browser": BROWSER}
OPUS = tuple(f"opus-{source}" for source in SOURCES)


def scripts(tmp: Path) -> dict[str, Path]:
    """The load's plans (bench/load.py): PCM chunks, Opus chunks after their two header pages,
    and the direct baseline's USP messages."""
    pcm = read_pcm16k(FIXTURE)
    size = int(32000 * CHUNK_S)
    pcm_chunks = [pcm[i : i + size] for i in range(0, len(pcm) - size + 1, size)]
    direct = [usp.encode_binary(usp.AUDIO, "bench", chunk, extra={"X-StreamId": "1"}) for chunk in pcm_chunks]
    plans: dict[str, dict[str, object]] = {
        "direct": {"interval": CHUNK_S, "head": "", "chunks": [c.hex() for c in direct]},
        "pcm": {"interval": CHUNK_S, "head": "", "chunks": [c.hex() for c in pcm_chunks]},
    }
    for source, encoder in SOURCES.items():
        pages = ogg_pages(encode_opus(pcm, "ogg", encoder=encoder))  # one packet a page
        audio = pages[2:]
        per_chunk = round(CHUNK_S * 1000 / encoder.frame_ms)  # 240 ms of 60-ms packets, say
        opus_chunks = [
            b"".join(audio[i : i + per_chunk]) for i in range(0, len(audio) - per_chunk + 1, per_chunk)
        ]
        plans[f"opus-{source}"] = {
            "interval": per_chunk * encoder.frame_ms / 1000,  # real time
            "head": (pages[0] + pages[1]).hex(),
            "chunks": [c.hex() for c in opus_chunks],
        }
        mean = statistics.mean(map(len, opus_chunks))
        pcm_bytes = 32 * per_chunk * encoder.frame_ms
        print(f"bytes per {per_chunk * encoder.frame_ms}-ms chunk: PCM {pcm_bytes:,}, ", end="")
        print(f"Opus from a {source} {mean:,.0f} ({pcm_bytes / mean:.1f} times less)")
    paths = {}
    for name, plan in plans.items():
        paths[name] = tmp / f"{name}.json"
        paths[name].write_text(json.dumps(plan))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", default="100,300,600")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per N; medians are shown")
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp, stack(Path(tmp)) as bench:
        plans = scripts(Path(tmp))
        relay_port = free_port()
        with bench.relay_process(relay_port, True) as relay:
            assert relay.proc is not None
            plain = f"ws://127.0.0.1:{relay_port}/v1/listen?language=en-US"
            targets = {
                "direct": (
                    f"ws://127.0.0.1:{bench.echo_port}/speech/recognition/conversation/cognitiveservices/v1",
                    None,
                ),
                "pcm": (f"{plain}&format=pcm", relay.proc.pid),
                **{name: (f"{plain}&format=ogg-opus", relay.proc.pid) for name in OPUS},
            }
            for name, (url, _) in targets.items():  # warm-up
                run_load(url, bench.token, 50, 2.0, None, plans[name])
            print(
                f"medians of {args.runs} interleaved runs of {args.seconds:g} s\n"
                f"{'N':>5} {'target':<13} {'p50/p99 ms':>14} {'added':>6} {'CPU':>5} {'lost':>5} "
                f"{'CPU/PCM':>7} (steal)"
            )
            knees: dict[str, list[int]] = {name: [] for name in OPUS}
            for n in counts:
                runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
                for _ in range(args.runs):
                    for name, (url, pid) in targets.items():
                        runs[name].append(run_load(url, bench.token, n, args.seconds, pid, plans[name]))

                def med(name: str, key: str, runs: dict[str, list[dict[str, float]]] = runs) -> float:
                    return statistics.median(r[key] for r in runs[name])

                print(f"{n:>5} {'direct':<13} {med('direct', 'p50'):>6.2f}/{med('direct', 'p99'):<7.2f}")
                for name in ("pcm", *OPUS):
                    added = statistics.median(
                        r["p99"] - d["p99"] for r, d in zip(runs[name], runs["direct"], strict=True)
                    )
                    lost = int(sum(r["sent"] - r["answered"] for r in runs[name]))
                    ratio = statistics.median(
                        o["cpu_share"] / p["cpu_share"] for o, p in zip(runs[name], runs["pcm"], strict=True)
                    )
                    print(
                        f"{'':>5} {name:<13} {med(name, 'p50'):>6.2f}/{med(name, 'p99'):<7.2f} {added:>6.1f} "
                        f"{med(name, 'cpu_share'):>5.0%} {lost:>5} {ratio:>7.2f} ({med(name, 'steal'):.0%})",
                        flush=True,
                    )
                    if name in knees and added < 50 and not lost:
                        knees[name].append(n)
            for name, fine in knees.items():
                largest = max(fine, default="none")
                print(f"largest N of {name} streams with added p99 < 50 ms and no chunk lost: {largest}")


if __name__ == "__main__":
    main()
