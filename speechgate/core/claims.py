"""Our access tokens: the claims, how they are signed, and how they are verified.

Shared by the token service (which signs) and the relay (which verifies at the handshake).
Tokens are RFC 9068 JWT access tokens (`typ: at+jwt`) signed with ES256.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from speechgate.core import jose
from speechgate.core.keys import ALGORITHM, SigningKey, b64url

TOKEN_TYPE = "at+jwt"  # noqa: S105 - a media type, not a password
SCOPES = ("speech:recognize", "speech:synthesize", "speech:translate")
_REQUIRED = ["iss", "aud", "sub", "client_id", "scope", "iat", "nbf", "exp", "jti", "max_session_s"]


class InvalidToken(Exception):
    """The token must be refused; `reason` is short and safe to show to the client."""

    def __init__(self, reason: str, expired: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expired = expired


@dataclass(frozen=True)
class AccessClaims:
    iss: str
    aud: str
    sub: str
    client_id: str
    scope: str
    iat: int
    nbf: int
    exp: int
    jti: str
    max_session_s: int
    lang: tuple[str, ...] = ()
    single_use: bool = False

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(self.scope.split())

    @property
    def usable_until(self) -> int:
        """The last moment this token can matter: a stream opened at `exp` runs `max_session_s`."""
        return self.exp + self.max_session_s

    def to_payload(self) -> dict[str, Any]:
        payload = {name: getattr(self, name) for name in _FIELDS}  # dataclasses.asdict is 5x slower
        payload["lang"] = list(self.lang)
        if not self.single_use:
            del payload["single_use"]
        return payload

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> AccessClaims:
        try:
            lang = payload.get("lang", [])
            claims = cls(
                iss=_typed(payload, "iss", str),
                aud=_typed(payload, "aud", str),
                sub=_typed(payload, "sub", str),
                client_id=_typed(payload, "client_id", str),
                scope=_typed(payload, "scope", str),
                iat=_typed(payload, "iat", int),
                nbf=_typed(payload, "nbf", int),
                exp=_typed(payload, "exp", int),
                jti=_typed(payload, "jti", str),
                max_session_s=_typed(payload, "max_session_s", int),
                lang=tuple(lang) if isinstance(lang, list) else (),
                single_use=payload.get("single_use") is True,
            )
        except TypeError as exc:
            raise InvalidToken(str(exc)) from None
        if not all(isinstance(item, str) for item in claims.lang):
            raise InvalidToken("claim 'lang' must be a list of strings")
        return claims


_FIELDS = tuple(f.name for f in fields(AccessClaims))


def _typed(payload: Mapping[str, Any], name: str, kind: type) -> Any:
    value = payload.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"claim {name!r} must be a {kind.__name__}")
    return value


def new_jti() -> str:
    return secrets.token_urlsafe(16)


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def sign(claims: AccessClaims, key: SigningKey) -> str:
    """ES256 compact JWS. Written out rather than `jwt.encode`, which measured twice the CPU on
    the token endpoint's hot path (generic header merging, sorting, key checks per call); the
    header segment is computed once per key. Tests verify the result with PyJWT."""
    payload = json.dumps(claims.to_payload(), separators=(",", ":")).encode()
    signing_input = f"{key.header_segment}.{b64url(payload)}"
    r, s = decode_dss_signature(key.private_key.sign(signing_input.encode("ascii"), _ECDSA_SHA256))
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def token_kid(token: str) -> str:
    """The `kid` of a token `verify` has passed (so its header is known to be well formed)."""
    header, _ = jose.split(token)
    return str(header.get("kid", ""))


def verify(
    token: str,
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    *,
    issuer: str,
    audience: str,
    check_exp: bool = True,
    leeway: int = 0,
) -> AccessClaims:
    """Verify one of our access tokens. Raises InvalidToken with a reason safe to return.

    With `check_exp=False` an expired token passes (the relay decides about reconnects itself);
    `InvalidToken.expired` tells an expired token from a bad one when it is checked.
    """
    try:
        header, _ = jose.split(token)
    except jose.MalformedToken as exc:
        raise InvalidToken(f"malformed token: {exc}") from None
    if header.get("alg") != ALGORITHM:
        raise InvalidToken(f"algorithm must be {ALGORITHM}")
    if str(header.get("typ", "")).lower() not in (TOKEN_TYPE, "application/" + TOKEN_TYPE):
        raise InvalidToken(f"token type must be {TOKEN_TYPE}")
    key = keys.get(header.get("kid", ""))  # a dict lookup: `kid` is never a path or URL
    if key is None:
        raise InvalidToken("token signed with an unknown key")
    try:
        payload = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={"require": _REQUIRED, "verify_exp": check_exp},
        )
    except jwt.InvalidTokenError as exc:
        expired = isinstance(exc, jwt.ExpiredSignatureError)
        raise InvalidToken(f"token {jose.failure(exc)}", expired=expired) from None
    return AccessClaims.from_payload(payload)
