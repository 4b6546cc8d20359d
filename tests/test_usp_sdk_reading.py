"""The relay's USP reader against the official JavaScript Speech SDK's own (its
WebsocketMessageFormatter, run in Node by tests/js/usp_headers.js): every message the SDK writes
is read by the relay as the SDK reads it, and every message the relay accepts at all, the SDK reads
with the same headers. What the two would read differently (a repeated Path, lone CR or LF, a
leading blank line, blanks around a name) the relay refuses (speechgate/relay/usp.py)."""

from __future__ import annotations

import json
import random
import subprocess
from typing import Any

from speechgate.relay import usp
from tests.support.js_sdk import JS

BODY = '{"phraseDetection":{"language":"en-US"}}'
HEADERS = [
    {"Path": "speech.context", "X-RequestId": "0" * 32, "X-Timestamp": "2026-12-07T10:00:00.000Z"},
    {"Path": "speech.config", "X-Timestamp": "2026-12-07T10:00:00.000Z", "Content-Type": "application/json"},
    {"Path": "ssml", "X-RequestId": "ab" * 16, "Content-Type": "application/ssml+xml"},
    {"X-Timestamp": "2026-12-07T10:00:00.000Z", "Path": "telemetry"},
    {"Path": "audio.commit", "X-Client-Commit-Token": "t-1", "X-Client-Commit-Channel-Index": "0"},
]


def sdk(node: str, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lines = "".join(json.dumps(job) + "\n" for job in jobs)
    done = subprocess.run(
        [node, str(JS / "usp_headers.js")],
        input=lines,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


def relay_reads(text: str) -> tuple[dict[str, str], str] | None:
    try:
        message = usp.parse_text(text)
    except usp.ProtocolError:
        return None
    return {k.lower(): v for k, v in message.headers.items()}, message.body.decode()


def mutations(seed: int, count: int) -> list[str]:
    """Messages near the SDK's: a header repeated, renamed in another case, blanks and line ends
    moved, a blank line first, control characters: what readers tend to disagree on."""
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        headers = [f"{k}:{v}" for k, v in rng.choice(HEADERS).items()]
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(headers))
            name, _, value = headers[at].partition(":")
            change = rng.randrange(8)
            if change == 0:
                headers.insert(rng.randrange(len(headers) + 1), f"{name.swapcase()}:other")
            elif change == 1:
                headers[at] = f"{name}: {value} "
            elif change == 2:
                headers[at] = f" {name}:{value}" if rng.random() < 0.5 else f"{name} :{value}"
            elif change == 3:
                headers[at] = f"{name}:{value}" + rng.choice(["\n", "\r", "\x0b"]) + "Path:ssml"
            elif change == 4:
                headers.insert(0, "")
            elif change == 5:
                headers[at] = name + value  # no colon
            elif change == 6:
                headers[at] = f"{name}:"  # an empty value
            else:
                headers[at] = f"{name.upper()}:{value}"
        made.append("\r\n".join(headers) + "\r\n\r\n" + BODY)
    return made


def test_every_message_the_sdk_writes_is_read_by_the_relay_as_the_sdk_reads_it(node: str) -> None:
    written = sdk(node, [{"write": {"headers": headers, "body": BODY}} for headers in HEADERS])
    texts = [each["text"] for each in written]
    read_back = sdk(node, [{"read": text} for text in texts])
    for text, theirs in zip(texts, read_back, strict=True):
        ours = relay_reads(text)
        assert ours is not None, text
        assert ours == (theirs["headers"], theirs["body"])


def test_what_the_relay_accepts_the_sdk_reads_the_same_and_what_they_differ_on_is_refused(node: str) -> None:
    corpus = mutations(seed=20261207, count=600)
    theirs = sdk(node, [{"read": text} for text in corpus])
    accepted = refused = 0
    for text, their in zip(corpus, theirs, strict=True):
        ours = relay_reads(text)
        if ours is None:
            refused += 1
            continue
        accepted += 1
        assert ours == (their["headers"], their["body"]), repr(text)
    # The corpus holds both kinds, and among what is refused, messages the SDK reads with another
    # Path than a first-match reader would (the ambiguity that once passed the checks).
    assert accepted > 100, accepted
    assert refused > 100, refused
    disagreeing = [
        text
        for text, their in zip(corpus, theirs, strict=True)
        if their["headers"].get("path") != usp.peek_path(text.encode()).decode()
    ]
    assert disagreeing
    assert all(relay_reads(text) is None for text in disagreeing)
