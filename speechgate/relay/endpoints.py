"""Which paths the relay serves, as the official Speech SDKs open them, without I/O.

A path names its door (the Azure-compatible one, whose frames pass verbatim, or the plain one), the
Azure service behind it (`stt`, `tts`, `s2s`: the host a region's endpoint is on), the scope a
token needs, and the query parameters Azure takes there. The SDKs and Microsoft's samples open:

- recognition v1: `/speech/recognition/{conversation,interactive,dictation}/cognitiveservices/v1`
  (native SDKs, `SpeechConfig.fromHost`), and its custom-domain form under `/stt`;
- universal v2: `/speech/universal/v2` (continuous language identification, the samples) and
  `/stt/speech/universal/v2` (the JavaScript SDK from 1.44, translation too): recognition, or
  translation when the query names targets (`to`);
- translation v1: `/speech/translation/cognitiveservices/v1` (native TranslationRecognizer);
- synthesis: `/cognitiveservices/websocket/v1` and `/tts/cognitiveservices/websocket/v1`
  (the JavaScript SDK from 1.44).

Meeting transcription, Direct Line Speech and Custom Commands are refused, naming the path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from speechgate.core.claims import AccessClaims
from speechgate.core.clients import ClientPolicy
from speechgate.relay.auth import Refusal, allow_language
from speechgate.relay.languages import Rules

PLAIN_PATH = "/v1/listen"
# What the relay's own clients open: the plain door's upstream, the stream command's --sdk, dev's banner.
CONVERSATION_PATH = "/speech/recognition/conversation/cognitiveservices/v1"

RECOGNITION_PARAMS = (
    "language",
    "format",
    "profanity",
    "wordLevelTimestamps",
    "initialSilenceTimeoutMs",
    "endSilenceTimeoutMs",
    "segmentationSilenceTimeoutMs",
    "segmentationMaximumTimeMs",
    "segmentationStrategy",
    "stableIntermediateThreshold",
    "postprocessing",
    "lidEnabled",
    "cid",
    "storeAudio",
)
TRANSLATION_PARAMS = ("from", "to", "voice", "features", "scenario", "stableTranslation")
SYNTHESIS_PARAMS = ("deploymentId", "enableTalkingAvatar")
SHARED_PARAMS = ("X-ConnectionId",)


def _names(*groups: tuple[str, ...]) -> Mapping[str, str]:
    """Lower-case name → Azure's spelling, for case-insensitive matching."""
    return {name.lower(): name for group in (SHARED_PARAMS, *groups) for name in group}


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "recognition", "universal", "translation", "synthesis" or "plain"
    service: str  # the Azure host family: "stt", "tts", "s2s" ("" for the plain door)
    params: Mapping[str, str]  # the query parameters passed on, by lower-case name

    @property
    def door(self) -> str:
        return "plain" if self.kind == "plain" else "azure"

    @property
    def synthesis(self) -> bool:
        return self.kind == "synthesis"

    def scopes(self, params: list[tuple[str, str]]) -> tuple[str, ...]:
        """The scopes a token needs one of here. Universal v2 translates when its query names
        targets; without them it may still translate, as its `speech.context` says (where the
        relay checks the scope again: relay.languages.Rules)."""
        if self.kind == "synthesis":
            return ("speech:synthesize",)
        if self.kind == "translation" or (self.kind == "universal" and _names_targets(params)):
            return ("speech:translate",)
        if self.kind == "universal":
            return ("speech:recognize", "speech:translate")
        return ("speech:recognize",)


def _names_targets(params: list[tuple[str, str]]) -> bool:
    return any(k.lower() == "to" for k, _ in params)


RECOGNITION = Endpoint("recognition", "stt", _names(RECOGNITION_PARAMS))
UNIVERSAL = Endpoint("universal", "stt", _names(RECOGNITION_PARAMS, TRANSLATION_PARAMS))
TRANSLATION = Endpoint("translation", "s2s", _names(RECOGNITION_PARAMS, TRANSLATION_PARAMS))
SYNTHESIS = Endpoint("synthesis", "tts", _names(SYNTHESIS_PARAMS))
PLAIN = Endpoint("plain", "", {})

_RECOGNITION_V1 = re.compile(
    r"^(/stt)?/speech/recognition/(conversation|interactive|dictation)/cognitiveservices/v1$"
)
_EXACT = {
    "/speech/universal/v2": UNIVERSAL,
    "/stt/speech/universal/v2": UNIVERSAL,
    "/speech/translation/cognitiveservices/v1": TRANSLATION,
    "/cognitiveservices/websocket/v1": SYNTHESIS,
    "/tts/cognitiveservices/websocket/v1": SYNTHESIS,
    PLAIN_PATH: PLAIN,
}
SYNTHESIS_PATHS = frozenset(path for path, endpoint in _EXACT.items() if endpoint is SYNTHESIS)
UNSUPPORTED = {
    "/speech/recognition/multiaudio": "meeting transcription",
    "/api/v3": "Direct Line Speech",
    "/commands/api/v1": "Custom Commands",
}


def message_rules(
    endpoint: Endpoint, params: list[tuple[str, str]], claims: AccessClaims, policy: ClientPolicy
) -> Rules:
    """What the app's messages on this stream may still ask for, after the handshake's checks."""
    return Rules(
        lang=claims.lang,
        scopes=frozenset(claims.scopes),
        max_targets=policy.max_translation_targets,
        universal=endpoint.kind == "universal",
        query_targets=_names_targets(params),
        query_language=any(k.lower() in ("language", "from") for k, _ in params),
    )


def endpoint_for(path: str) -> Endpoint:
    """The endpoint of a request path, or a Refusal (404) that says what is served."""
    found = _EXACT.get(path)
    if found is not None:
        return found
    if _RECOGNITION_V1.match(path):
        return RECOGNITION
    for prefix, what in UNSUPPORTED.items():
        if path == prefix or path.startswith(prefix + "/") or path.startswith("/stt" + prefix):
            raise Refusal(404, "unsupported_endpoint", f"{path[:80]} ({what}) is not supported by this relay")
    raise Refusal(
        404,
        "not_found",
        f"no such endpoint; use /speech/recognition/<mode>/cognitiveservices/v1, /speech/universal/v2, "
        f"/speech/translation/cognitiveservices/v1, /cognitiveservices/websocket/v1 or {PLAIN_PATH}",
    )


def _gate_allows(policy: ClientPolicy, name: str, value: str) -> bool:
    """Parameters that cost money or keep data, as the client's policy allows them."""
    if name == "cid":  # a Custom Speech model
        return "*" in policy.custom_models or value in policy.custom_models
    if name == "deploymentId":  # a custom voice
        return "*" in policy.custom_voices or value in policy.custom_voices
    if name == "storeAudio":  # Azure keeps the audio
        return value.lower() in ("false", "0") or policy.store_audio
    return True


def upstream_query(
    endpoint: Endpoint, params: list[tuple[str, str]], policy: ClientPolicy, claims: AccessClaims
) -> str:
    """The query to pass on to Azure: the endpoint's known parameters, once each (translation targets
    may come as several `to`), those the policy gates only as it allows, translation languages
    only as the token allows; credentials and anything unknown are dropped. Values are encoded
    again, never pasted: a decoded `&` or `#` stays inside its value."""
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()
    targets: list[str] = []
    for raw_name, value in params:
        name = endpoint.params.get(raw_name.lower())
        if name is None:
            continue
        if name in seen and name != "to":
            raise Refusal(400, "invalid_request", f"send the {name} parameter once")
        seen.add(name)
        if not _gate_allows(policy, name, value):
            raise Refusal(
                403, "parameter_not_allowed", f"{name}={value[:40]} is not allowed for this app's client"
            )
        if name == "from":
            allow_language(claims, value)
        if name == "to":
            targets += [t.strip() for t in value.split(",")]
        kept.append((name, value))
    for target in targets:
        allow_language(claims, target, target=True)
    if len(targets) > policy.max_translation_targets:
        raise Refusal(
            403,
            "too_many_targets",
            f"{len(targets)} translation targets; this app's client allows {policy.max_translation_targets}",
        )
    return urlencode(kept)


def upstream_path(endpoint: Endpoint, path: str, custom_endpoint: bool) -> str:
    """The path to open at Azure: as the app sent it, but for the custom-domain `/stt` form of the
    v1 recognition paths, which a region's own host serves without the prefix."""
    if endpoint.kind == "recognition" and not custom_endpoint:
        return path.removeprefix("/stt")
    return path
