"""What a USP message asks for, without I/O: a token's `lang` claim and scopes, and the client's
translation targets, hold inside the protocol, not only in the query string.

- `speech.context` (JSON): `phraseDetection.language` and the candidates of language
  identification, `languageId.languages`; translation targets, `translation.targetLanguages`
  (which need the `speech:translate` scope), and the voices of spoken translation,
  `synthesis.defaultVoices`;
- `ssml` (XML): every `xml:lang` (on `<speak>`, `<lang>`, anything) and each `<voice name>`'s
  locale (`en-US-AvaNeural`, or the long form `Microsoft Server Speech Text to Speech Voice
  (en-US, AvaNeural)`).

The relay reads every `speech.context` on the Azure door (translation targets and their scope hold
whatever languages a token allows), and SSML for tokens that restrict languages; a message it
cannot read is refused (Azure would refuse it too), since what it cannot read it cannot check.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from speechgate.core.jose import loads_strict
from speechgate.relay import usp

XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_LONG_VOICE = re.compile(r"\(\s*([A-Za-z]{2,3}-[A-Za-z0-9]{2,8})\s*,")
_SHORT_VOICE = re.compile(r"^([A-Za-z]{2,3}-[A-Za-z0-9]{2,8})-")
CHECKED_PATHS = frozenset({usp.SPEECH_CONTEXT, usp.SSML})


class Unreadable(ValueError):
    """A message whose languages cannot be read; the text says what is wrong."""


def allows(allowed: Iterable[str], locale: str, target: bool = False) -> bool:
    """Whether `allowed` holds `locale` (a translation `target` may be a bare language: `de`
    passes when `de-DE` is allowed, as at the handshake)."""
    lowered = {x.lower() for x in allowed}
    wanted = locale.lower()
    if "*" in lowered or wanted in lowered:
        return True
    return target and "-" not in wanted and any(x.startswith(wanted + "-") for x in lowered)


def restricts(allowed: Iterable[str]) -> bool:
    return "*" not in allowed


@dataclass(frozen=True)
class Asked:
    """What a `speech.context` asks for: recognition languages (the phrase language and the
    candidates of language identification), translation targets, and the voices' locales."""

    languages: list[str]
    targets: list[str]
    voices: list[str]  # the voices' names


def in_context(body: bytes) -> Asked:
    try:
        doc = loads_strict(body)
    except ValueError:  # duplicate members and nesting too deep included
        raise Unreadable("speech.context is not JSON") from None
    if not isinstance(doc, dict):
        raise Unreadable("speech.context is not a JSON object")
    languages: list[Any] = []
    detection = doc.get("phraseDetection")
    if isinstance(detection, dict) and "language" in detection:
        languages.append(detection["language"])
    language_id = doc.get("languageId")
    if isinstance(language_id, dict) and "languages" in language_id:
        languages += _listed(language_id["languages"])
    translation = doc.get("translation")
    targets = _listed(translation.get("targetLanguages", [])) if isinstance(translation, dict) else []
    synthesis = doc.get("synthesis")
    voices: list[str] = []  # their names: a locale is read from each only where the token needs it
    if isinstance(synthesis, dict) and isinstance(synthesis.get("defaultVoices"), dict):
        voices = [str(name) for name in synthesis["defaultVoices"].values()]
    if not all(isinstance(x, str) for x in (*languages, *targets)):
        raise Unreadable("speech.context names a language that is not a string")
    return Asked(languages, targets, voices)


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _voice_locale(name: str) -> str:
    match = _LONG_VOICE.search(name) or _SHORT_VOICE.match(name)
    if match is None:
        raise Unreadable(f"voice name {name[:40]!r} has no locale")
    return match.group(1)


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
            found.append(_voice_locale(element.attrib["name"]))
    return found


@dataclass(frozen=True)
class Rules:
    """What the app's messages on one stream may ask for: the token's languages and scopes, the
    client's translation targets, and what the handshake already settled. Universal v2 carries
    recognition or translation, and its languages, in `speech.context` only (the native SDKs put
    nothing in its query), so the scope that the handshake could not check is checked here."""

    lang: tuple[str, ...]
    scopes: frozenset[str] = frozenset()
    max_targets: int = 0
    universal: bool = False  # the endpoint is universal v2: speech.context says what it is
    query_targets: bool = False  # the query named translation targets (checked at the handshake)
    query_language: bool = False  # the query named the language (checked at the handshake)


def refusal(rules: Rules, path: str, body: bytes) -> str | None:
    """Why a message on `path` may not pass under `rules`, or None."""
    try:
        if path == usp.SSML:
            return _not_allowed(rules.lang, in_ssml(body)) if restricts(rules.lang) else None
        asked = in_context(body)
        voices = [_voice_locale(name) for name in asked.voices] if restricts(rules.lang) else []
    except Unreadable as exc:
        return f"{exc}; what it asks for cannot be checked"
    if asked.targets:
        if "speech:translate" not in rules.scopes:
            return "this token lacks the speech:translate scope"
        if len(asked.targets) > rules.max_targets:
            return f"{len(asked.targets)} translation targets; this app's client allows {rules.max_targets}"
    elif rules.universal and not rules.query_targets and "speech:recognize" not in rules.scopes:
        return "this token lacks the speech:recognize scope"
    if restricts(rules.lang) and rules.universal and not rules.query_language and not asked.languages:
        return f"this token allows only {', '.join(rules.lang)}: say which language"
    return _not_allowed(rules.lang, asked.languages + voices) or _not_allowed(
        rules.lang, asked.targets, target=True
    )


def _not_allowed(allowed: tuple[str, ...], locales: list[str], target: bool = False) -> str | None:
    for locale in locales:
        if not allows(allowed, locale, target):
            return f"language {locale[:20]} is not allowed for this token; allowed: {', '.join(allowed)}"
    return None
