"""An offline stand-in for Azure Speech synthesis, for `speechgate dev`: espeak-ng behind USP.

As Azure does, it answers an `ssml` message with `turn.start`, `response` (the stream id the
JavaScript SDK waits for), audio frames in the output format that `synthesis.context` asked for,
and `turn.end`. It speaks 16-bit mono PCM formats only (`raw-…` and `riff-…-16bit-mono-pcm`, at
any rate); what it cannot do closes the connection with 1007 and the reason, which the relay
passes on so that the SDKs cancel at once and show it. The voice is robotic: it is for trying the
path, not for judging synthesis.

The protocol logic is pure (`pcm_format`, `ssml_text`, `synthesis_messages`); `speak` is the edge:
espeak-ng in a subprocess, the text on its standard input, never on a command line.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from xml.etree import ElementTree

from speechgate.devtools.wav import resample_pcm16
from speechgate.relay import usp

ESPEAK = shutil.which("espeak-ng")
ESPEAK_RATE = 22050  # what espeak-ng writes
MAX_TEXT = 10_000  # characters; Azure's own limit on one request's text is of this order
JSON = "application/json; charset=utf-8"
_PCM = re.compile(r"(?P<kind>raw|riff)-(?P<rate>\d+)(?P<k>k?)hz-16bit-mono-pcm")
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


class SynthesisError(ValueError):
    """What the offline synthesizer cannot do; the message says so."""


def pcm_format(name: str) -> tuple[bool, int]:
    """(with a WAV header, sample rate) of a 16-bit mono PCM output format such as
    `raw-16khz-16bit-mono-pcm` or `riff-22050hz-16bit-mono-pcm`."""
    match = _PCM.fullmatch(name.strip().lower())
    rate = int(match["rate"]) * (1000 if match["k"] else 1) if match else 0
    if match is None or not 8000 <= rate <= 48000:
        raise SynthesisError(
            f"offline synthesizer: 16-bit mono PCM formats only, not {name}"  # fits a close reason
        )
    return match["kind"] == "riff", rate


def ssml_text(ssml: str) -> tuple[str, str]:
    """The words an SSML document says (its markup dropped) and its language."""
    try:
        root = ElementTree.fromstring(ssml)  # noqa: S314 - dev only, loopback, and expat refuses entity bombs
    except ElementTree.ParseError as exc:
        raise SynthesisError(f"offline synthesizer: the SSML does not parse ({exc})") from None
    text = " ".join("".join(root.itertext()).split())
    if not text:
        raise SynthesisError("offline synthesizer: the SSML has no text to speak")
    if len(text) > MAX_TEXT:
        raise SynthesisError(f"offline synthesizer: at most {MAX_TEXT} characters of text")
    return text, root.get(_XML_LANG) or "en-US"


def synthesis_messages(request_id: str, pcm: bytes, riff: bool, rate: int) -> list[str | bytes]:
    """What Azure sends for a synthesis: `pcm` (16-bit mono at `rate`) in frames of 100 ms."""
    stream_id = usp.new_request_id()
    audio = (usp.riff_header(rate) if riff else b"") + pcm
    chunk = rate * 2 // 10
    return [
        usp.encode_text(usp.TURN_START, request_id, {"context": {"serviceTag": usp.new_request_id()}}, JSON),
        usp.encode_text(usp.RESPONSE, request_id, {"audio": {"streamId": stream_id}}, JSON),
        *(
            usp.encode_binary(
                usp.AUDIO, request_id, audio[i : i + chunk], "audio/x-wav", extra={"X-StreamId": stream_id}
            )
            for i in range(0, len(audio), chunk)
        ),
        usp.encode_text(usp.TURN_END, request_id, {}, JSON),
    ]


async def speak(text: str, language: str, rate: int) -> bytes:
    """The text spoken by espeak-ng in the language's voice, as 16-bit mono PCM at `rate`."""
    if ESPEAK is None:
        raise SynthesisError("offline synthesizer: install espeak-ng (apt install espeak-ng)")
    for voice in dict.fromkeys((language.lower(), language.lower().split("-")[0])):  # en-us, then en
        process = await asyncio.create_subprocess_exec(
            ESPEAK,
            "-v",
            voice,
            "--stdout",
            "--stdin",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        wav, _ = await process.communicate(text.encode("utf-8"))
        if process.returncode == 0 and len(wav) > 44:  # its header claims an endless stream
            return await asyncio.to_thread(resample_pcm16, wav[44:], ESPEAK_RATE, rate)
    raise SynthesisError(f"offline synthesizer: espeak-ng has no voice for {language}")
