"""Benchmark: the Python CPU the relay spends per frame pair, without sockets.

One audio frame up (3,200 bytes of PCM in a USP binary message, masked as an app sends it) and
one hypothesis down, as in bench/relay_latency.py, fed straight into the splice's two legs
(speechgate/relay/splice.py) with transports that only count what is written. The baseline, in the same
run: the same two frames through `websockets`' sans-I/O protocols as the relay's message path
frames them (parsed and unmasked on one side, re-framed and masked on the other).

    uv run python -m bench.splice_cpu [--pairs 200000] [--runs 5]

The figures are the interpreter's share of a frame pair; the kernel's socket work and the event
loop's dispatch come on top (bench/relay_latency.py measures the whole). This one is steady enough
on a noisy machine to compare changes to the hot path: medians of `--runs`, both interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from types import SimpleNamespace
from typing import Any, cast

from prometheus_client import CollectorRegistry
from websockets.client import ClientProtocol
from websockets.frames import Frame
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from bench.echo_upstream import ANSWER
from bench.load import masked_frame
from speechgate.core.claims import AccessClaims
from speechgate.core.settings import Settings
from speechgate.relay import usp
from speechgate.relay.languages import Rules
from speechgate.relay.live import Live
from speechgate.relay.metrics import RelayMetrics
from speechgate.relay.sessions import Stream
from speechgate.relay.splice import Splice

AUDIO = usp.encode_binary("audio", "bench", b"\x01\x00" * 1600, extra={"X-StreamId": "1"})


class Sink:
    """A transport that takes what the splice writes and keeps only the count."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes | bytearray) -> None:
        self.written += len(data)

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


class Handshaken:
    """What the splice takes over from a `websockets` connection: its transport."""

    def __init__(self) -> None:
        self.transport = Sink()


def splice_pairs(pairs: int) -> float:
    """Seconds of CPU per frame pair through the splice."""

    async def run() -> float:
        relay = SimpleNamespace(settings=Settings(), metrics=RelayMetrics(CollectorRegistry()))
        claims = AccessClaims("bench", "bench", "bench", "bench", "speech", 0, 0, 0, "bench", 86400)
        live = Live(
            connection=cast(Any, None),
            stream=Stream(claims, "bench", 0),
            door="azure",
            kid="bench",
            rules=Rules(lang=("*",)),
        )
        splice = Splice(cast(Any, relay), live, Handshaken(), Handshaken())
        live.opened = -1e12  # far faster than real time, which is not what this measures
        splice.start()
        up, down = masked_frame(AUDIO), ANSWER
        app, azure = splice.app, splice.azure
        started = time.process_time()
        for _ in range(pairs):
            app.data_received(up)
            azure.data_received(down)
        spent = time.process_time() - started
        assert azure.transport.written == len(up) * pairs  # every frame went through
        assert live.stream.closing_reason is None
        return spent / pairs

    return asyncio.run(run())


def websockets_pairs(pairs: int) -> float:
    """Seconds of CPU per frame pair framed by `websockets`' sans-I/O protocols."""
    app_side = ServerProtocol(state=State.OPEN, max_size=2**20)
    azure_side = ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN, max_size=2**20)
    up, down = masked_frame(AUDIO), ANSWER
    started = time.process_time()
    for _ in range(pairs):
        app_side.receive_data(up)
        for event in app_side.events_received():
            assert isinstance(event, Frame)
            azure_side.send_binary(event.data)
        azure_side.data_to_send()
        azure_side.receive_data(down)
        for event in azure_side.events_received():
            assert isinstance(event, Frame)
            app_side.send_text(event.data)
        app_side.data_to_send()
    return (time.process_time() - started) / pairs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    splice_pairs(args.pairs // 10)  # warm-up
    websockets_pairs(args.pairs // 10)
    ours, theirs = [], []
    for _ in range(args.runs):
        ours.append(splice_pairs(args.pairs))
        theirs.append(websockets_pairs(args.pairs))
    a, b = statistics.median(ours) * 1e6, statistics.median(theirs) * 1e6
    print(f"CPU per frame pair (median of {args.runs} runs of {args.pairs:,} pairs):")
    print(f"  splice (speechgate/relay/splice.py)          {a:6.2f} µs")
    print(f"  websockets sans-I/O (the baseline) {b:6.2f} µs")
    print(f"  ratio splice / websockets          {a / b:6.3f}")


if __name__ == "__main__":
    main()
