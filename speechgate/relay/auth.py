"""Who may open a stream: the JWT at the WebSocket handshake, checked before any upgrade.

The token comes from `Authorization: Bearer …` (what the Speech SDKs send), the `Authorization`
query parameter (the JavaScript SDK copies it there; browsers send it only there) or
`access_token` (the plain front door). It is verified against the token service's JWKS
(cached; refetched on an unknown `kid` and when the signing keys change; kept when the JWKS
cannot be fetched). A token signed by a revoked key is refused whatever the JWKS says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from speechgate.core.claims import AccessClaims, InvalidToken, verify
from speechgate.core.clients import LOCALE
from speechgate.core.idp import IdpUnavailable, JwksCache
from speechgate.core.revocation import SIGNING_KEY_REVOKED
from speechgate.core.settings import Settings
from speechgate.relay.languages import allows

# Query parameters that carry credentials: read here, never logged, never sent upstream.
CREDENTIAL_PARAMS = frozenset({"authorization", "access_token", "ocp-apim-subscription-key"})


# Every `error` a refusal of a handshake carries: the relay's metrics hold a series for each from
# the start (a panel or alert on one reads 0, not "no data"); tests/test_relay_endpoints.py finds
# every one the code raises in this set.
REFUSAL_ERRORS = (
    "missing_token",
    "invalid_token",
    "token_expired",
    "token_revoked",
    "token_used",
    "token_in_use",
    "session_over",
    "insufficient_scope",
    "invalid_request",
    "not_found",
    "unsupported_endpoint",
    "language_required",
    "language_not_allowed",
    "parameter_not_allowed",
    "too_many_targets",
    "unsupported_format",
    "upgrade_required",
    "client_disabled",
    "origin_not_allowed",
    "too_many_streams",
    "audio_quota",
    "draining",
    "unavailable",
    "upstream_capacity",
    "upstream_unavailable",
    "no_upstream",
)


@dataclass(frozen=True)
class Refusal(Exception):
    """An HTTP answer instead of the upgrade: status, a short error code and what to fix."""

    status: int
    error: str
    message: str
    retry_after: int | None = None


def split_target(target: str) -> tuple[str, list[tuple[str, str]]]:
    """Path and query parameters of a request target."""
    parts = urlsplit(target)
    return parts.path, parse_qsl(parts.query, keep_blank_values=True)


_ENCODED_SEPARATORS = ("%2f", "%5c", "%2e")


def plain_path(path: str) -> bool:
    """Whether a request path means one thing to everyone who reads it: no `.`/`..` or empty
    segments, no encoded slash, backslash or dot. Routing and scope checks read the path as
    sent while Azure (or a proxy) may normalize it: `/a/../b` must never pass as `/a/...`."""
    if "\\" in path or "//" in path or any(code in path.lower() for code in _ENCODED_SEPARATORS):
        return False
    return not any(segment in (".", "..") for segment in path.split("/"))


def find_token(headers: Mapping[str, str], params: list[tuple[str, str]], plain: bool) -> str | None:
    header = headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for name, value in params:
        lowered = name.lower()
        if lowered == "authorization":
            scheme, _, rest = value.partition(" ")
            return rest.strip() if scheme.lower() == "bearer" else value.strip()
        if plain and lowered == "access_token":
            return value.strip()
    return None


class Authenticator:
    def __init__(self, settings: Settings, jwks: JwksCache) -> None:
        self.settings = settings
        self.jwks = jwks
        # Kids of leaked signing keys, as the revocation events name them: refused here even
        # while Redis is down or a JWKS fetched before the token service reloaded still has them.
        self.distrusted: set[str] = set()

    def keys_changed(self) -> None:
        """The token service's signing keys changed: fetch its JWKS at the next handshake."""
        self.jwks.expire(self.settings.token_jwks_url)

    async def verify(self, token: str | None) -> tuple[AccessClaims, str]:
        """The token's claims, expired or not (the caller decides about reconnects), and the kid
        of the key that signed it."""
        if not token:
            raise Refusal(401, "missing_token", "send the access token as 'Authorization: Bearer <token>'")
        header_kid = _kid(token)
        if header_kid in self.distrusted:
            raise Refusal(401, "token_revoked", f"{SIGNING_KEY_REVOKED}; get a new token")
        try:
            key = await self.jwks.key(self.settings.token_jwks_url, header_kid)
        except IdpUnavailable:
            raise Refusal(
                503, "unavailable", "the token service's keys cannot be fetched; retry", 5
            ) from None
        keys = {header_kid: key.key} if key is not None and header_kid else {}
        try:
            claims = verify(
                token, keys, issuer=self.settings.issuer, audience=self.settings.audience, check_exp=False
            )
        except InvalidToken as exc:
            raise Refusal(401, "invalid_token", exc.reason) from None
        assert header_kid is not None  # verify found its key by it
        return claims, header_kid


def authorize(claims: AccessClaims, scopes: tuple[str, ...], languages: list[str], required: bool) -> None:
    """The token's scope (any of `scopes`), and its languages against the query's (`required`:
    where a missing `language=` would let Azure pick one the token may not allow)."""
    if not any(scope in claims.scopes for scope in scopes):
        raise Refusal(403, "insufficient_scope", f"this token lacks the {' or '.join(scopes)} scope")
    if len(languages) > 1:
        raise Refusal(400, "invalid_request", "send the language parameter once")
    restricted = "*" not in claims.lang
    if not languages:
        if restricted and required:
            raise Refusal(
                403,
                "language_required",
                f"this token allows only {', '.join(claims.lang)}: say which with language=",
            )
        return
    allow_language(claims, languages[0])


def allow_language(claims: AccessClaims, language: str, target: bool = False) -> None:
    """A locale the token allows (a translation `target` may be a bare language: `de` passes when
    the token allows `de` or any `de-…` locale)."""
    if not LOCALE.match(language):
        raise Refusal(400, "invalid_request", f"{language[:20]!r} is not a locale such as en-US")
    if allows(claims.lang, language, target):
        return
    raise Refusal(
        403,
        "language_not_allowed",
        f"language {language} is not allowed for this token; allowed: {', '.join(claims.lang)}",
    )


def _kid(token: str) -> str | None:
    from speechgate.core import jose

    try:
        header, _ = jose.split(token)
    except jose.MalformedToken as exc:
        raise Refusal(401, "invalid_token", f"malformed token: {exc}") from None
    kid = header.get("kid")
    return kid if isinstance(kid, str) else None
