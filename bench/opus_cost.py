"""Benchmark: what Opus saves on the wire and what decoding it costs, without sockets.

    uv run python -m bench.opus_cost [--seconds 60] [--runs 5]

For the test fixture (tests/data/speech.wav, 4.8 s of speech) encoded at 24 kbit/s as phones
send it (at 16 kHz in 20-ms packets: SILK) and as Chromium's MediaRecorder does (at 48 kHz in
60-ms packets: hybrid and CELT; speechgate.devtools.compress.PHONE and BROWSER): bytes
per audio second in Ogg and in WebM against 16 kHz PCM. Then the relay's CPU per audio second for
one stream: reading the container and decoding (speechgate.relay.opus.Transcoder, fed 250-ms
chunks cut where the bytes fall) with each engine, libopus and FFmpeg, against the work the plain
door does for PCM in the same run (framing each chunk as a USP audio message), and the longest
single call, which is what holds up the event loop when a chunk is decoded on it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from speechgate.devtools.compress import BROWSER, PHONE, encode_opus
from speechgate.devtools.wav import read_pcm16k
from speechgate.relay import libopus, usp
from speechgate.relay.opus import Transcoder, native

FIXTURE = Path(__file__).parent.parent / "tests" / "data" / "speech.wav"
PCM_BYTES_PER_S = 32000
CHUNK_S = 0.25
SOURCES = {"phone": PHONE, "browser": BROWSER}


def chunks(data: bytes, audio_s: float) -> list[bytes]:
    size = max(1, round(len(data) / audio_s * CHUNK_S))
    return [data[i : i + size] for i in range(0, len(data), size)]


def decode_seconds(
    data: bytes, kind: str, library: libopus.Library | None, audio_s: float, seconds: float
) -> tuple[float, float]:
    """CPU seconds per audio second, and the longest `feed` call (ms), over `seconds` of audio."""
    pieces = chunks(data, audio_s)
    longest, used, heard = 0.0, 0.0, 0.0
    while heard < seconds:
        transcoder = Transcoder(kind, library)  # a new stream each time round: headers and all
        for piece in pieces:
            started = time.process_time()
            transcoder.feed(piece)
            spent = time.process_time() - started
            used += spent
            longest = max(longest, spent)
        heard += audio_s
    return used / heard, longest * 1000


def pcm_seconds(pcm: bytes, seconds: float) -> float:
    """What the plain door does with PCM per audio second: a USP audio message per chunk."""
    pieces = chunks(pcm, len(pcm) / PCM_BYTES_PER_S)
    used, heard = 0.0, 0.0
    while heard < seconds:
        started = time.process_time()
        for piece in pieces:
            usp.encode_binary(usp.AUDIO, "bench", piece, extra={"X-StreamId": "1"})
        used += time.process_time() - started
        heard += len(pcm) / PCM_BYTES_PER_S
    return used / heard


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="audio seconds decoded per run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    pcm = read_pcm16k(FIXTURE)
    audio_s = len(pcm) / PCM_BYTES_PER_S
    library = native()
    if library is None:
        sys.exit("libopus not found: only FFmpeg would be measured")
    print(
        f"fixture: {audio_s:.2f} s; 16 kHz PCM: {PCM_BYTES_PER_S:,} bytes per audio second; {library.version}"
    )
    encoded = {
        (source, kind): encode_opus(pcm, kind.split("-")[0], encoder=encoder)
        for source, encoder in SOURCES.items()
        for kind in ("ogg-opus", "webm-opus")
    }
    for (source, kind), data in encoded.items():
        per_s = len(data) / audio_s
        print(
            f"  {source:>7} {kind:>9}: {per_s:8,.0f} bytes per audio second, "
            f"{PCM_BYTES_PER_S / per_s:5.1f} times less than PCM"
        )
    print(
        f"\nCPU per audio second of one stream, medians of {args.runs} interleaved runs of {args.seconds:g} s"
    )
    engines = {"libopus": library, "ffmpeg": None}
    cases = [(source, kind, engine) for source, kind in encoded for engine in engines]
    pcm_runs: list[float] = []
    results: dict[tuple[str, str, str], list[tuple[float, float]]] = {case: [] for case in cases}
    for _ in range(args.runs):
        pcm_runs.append(pcm_seconds(pcm, args.seconds))
        for source, kind, engine in cases:
            data = encoded[(source, kind)]
            results[(source, kind, engine)].append(
                decode_seconds(data, kind, engines[engine], audio_s, args.seconds)
            )
    pcm_cost = statistics.median(pcm_runs)
    print(f"  {'pcm':>25}: {pcm_cost * 1000:7.3f} ms (framing 250-ms chunks as USP messages: the baseline)")
    for source, kind, engine in cases:
        cost = statistics.median(c for c, _ in results[(source, kind, engine)])
        longest = statistics.median(m for _, m in results[(source, kind, engine)])
        ffmpeg = statistics.median(c for c, _ in results[(source, kind, "ffmpeg")])
        print(
            f"  {source:>7} {kind:>9} {engine:>7}: {cost * 1000:7.3f} ms, "
            f"{cost / pcm_cost:5.1f} times the PCM path, {cost / ffmpeg:4.2f} of FFmpeg's; "
            f"one core decodes {1 / cost:,.0f} real-time streams; "
            f"longest call {longest:.2f} ms"
        )


if __name__ == "__main__":
    main()
