"""Which languages a USP message asks for, without I/O: a token's `lang` claim holds inside the
protocol, not only in the query string.

- `speech.context` (JSON): `phraseDetection.language` and the candidates of language
  identification, `languageId.languages`;
- `ssml` (XML): every `xml:lang` (on `<speak>`, `<lang>`, anything) and each `<voice name>`'s
  locale (`en-US-AvaNeural`, or the long form `Microsoft Server Speech Text to Speech Voice
  (en-US, AvaNeural)`).

The relay reads these messages only for tokens that restrict languages; a message it cannot read
is refused for such a token (Azure would refuse it too), since what it cannot read it cannot check.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from relay import usp
from token_service.jose import loads_strict

XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_LONG_VOICE = re.compile(r"\(\s*([A-Za-z]{2,3}-[A-Za-z0-9]{2,8})\s*,")
_SHORT_VOICE = re.compile(r"^([A-Za-z]{2,3}-[A-Za-z0-9]{2,8})-")
CHECKED_PATHS = frozenset({"speech.context", "ssml"})


class Unreadable(ValueError):
    """A message whose languages cannot be read; the text says what is wrong."""


def allows(allowed: Iterable[str], locale: str) -> bool:
    lowered = {x.lower() for x in allowed}
    return "*" in lowered or locale.lower() in lowered


def restricts(allowed: Iterable[str]) -> bool:
    return "*" not in allowed


def in_context(body: bytes) -> list[str]:
    try:
        doc = loads_strict(body)
    except ValueError:  # duplicate members and nesting too deep included
        raise Unreadable("speech.context is not JSON") from None
    if not isinstance(doc, dict):
        raise Unreadable("speech.context is not a JSON object")
    found: list[Any] = []
    detection = doc.get("phraseDetection")
    if isinstance(detection, dict) and "language" in detection:
        found.append(detection["language"])
    language_id = doc.get("languageId")
    if isinstance(language_id, dict) and "languages" in language_id:
        candidates = language_id["languages"]
        found += candidates if isinstance(candidates, list) else [candidates]
    if not all(isinstance(x, str) for x in found):
        raise Unreadable("speech.context names a language that is not a string")
    return found


def in_ssml(body: bytes) -> list[str]:
    try:
        root = fromstring(body)
    except (ParseError, DefusedXmlException, ValueError):
        raise Unreadable("the SSML is not well-formed XML") from None
    found = []
    for element in root.iter():
        if XML_LANG in element.attrib:
            found.append(element.attrib[XML_LANG])
        if str(element.tag).rpartition("}")[2] == "voice" and "name" in element.attrib:
            name = element.attrib["name"]
            match = _LONG_VOICE.search(name) or _SHORT_VOICE.match(name)
            if match is None:
                raise Unreadable(f"voice name {name[:40]!r} has no locale")
            found.append(match.group(1))
    return found


def message_refusal(allowed: tuple[str, ...], payload: bytes | bytearray) -> str | None:
    """Why a whole text message from the app may not pass for a token allowing `allowed`."""
    try:
        message = usp.parse_text(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, usp.ProtocolError):
        return "a text message that is not USP; this token's languages cannot be checked"
    path = message.path.lower()
    return refusal(allowed, path, message.body) if path in CHECKED_PATHS else None


def refusal(allowed: tuple[str, ...], path: str, body: bytes) -> str | None:
    """Why a message on `path` may not pass for a token allowing `allowed`, or None."""
    try:
        found = in_context(body) if path == "speech.context" else in_ssml(body)
    except Unreadable as exc:
        return f"{exc}; this token's languages cannot be checked"
    for locale in found:
        if not allows(allowed, locale):
            return f"language {locale[:20]} is not allowed for this token; allowed: {', '.join(allowed)}"
    return None
