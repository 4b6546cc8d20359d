"""Strict pre-checks of a compact JWS before PyJWT sees it.

PyJWT verifies signatures and registered claims, but accepts duplicated JSON members (the last
one wins, and another parser may pick the first) and tokens of any size. These checks run first,
for our access tokens and for identity-provider tokens alike (RFC 8725 §3.4, §3.7).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import jwt

MAX_TOKEN_BYTES = 8 * 1024


class MalformedToken(ValueError):
    """Not a well-formed JWS; the message says what is wrong and never echoes the token."""


class DuplicateMember(ValueError):
    """A JSON object names one member twice: parsers disagree on which one wins."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise DuplicateMember(f"duplicate member {name!r}")
        result[name] = value
    return result


def loads_strict(text: str | bytes | bytearray) -> Any:
    """`json.loads` for untrusted input: DuplicateMember instead of keeping the last duplicate, and
    a ValueError (not a RecursionError, which no caller expects) for nesting past the
    interpreter's limit."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def failure(exc: Exception) -> str:
    """What is wrong with a token that PyJWT refused, in words fit to show the client."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "has expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "is not yet valid"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "is for another audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "is from an unexpected issuer"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"lacks the {exc.claim!r} claim"
    return "has an invalid signature or claims"


def _decode_segment(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = loads_strict(raw.decode("utf-8"))
    except DuplicateMember as exc:
        raise MalformedToken(f"{what}: {exc}") from None
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise MalformedToken(f"{what} is not base64url-encoded UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise MalformedToken(f"{what} is not a JSON object")
    return value


def split(token: str, max_bytes: int = MAX_TOKEN_BYTES) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and payload of a compact JWS, checked for size, shape and duplicate members."""
    if len(token) > max_bytes:
        raise MalformedToken(f"token longer than {max_bytes} bytes")
    if not token.isascii():
        raise MalformedToken("token has non-ASCII characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedToken("not a compact JWS (three dot-separated parts)")
    header = _decode_segment(parts[0], "header")
    payload = _decode_segment(parts[1], "payload")
    if "crit" in header:
        # We understand no critical extension (RFC 7515 §4.1.11); PyJWT's own check came late.
        raise MalformedToken("critical header extensions are not supported")
    if header.get("b64") is False:
        raise MalformedToken("unencoded payloads are not supported")
    return header, payload
