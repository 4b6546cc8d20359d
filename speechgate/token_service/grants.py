"""The grants without I/O: what a token request may ask for, and the claims it gets.

Parameters in, values or an `OAuthError` out: the subject of a client-credentials request, the
checks of a token exchange before its subject token is verified, the scope and languages a policy
allows, the claims of the token issued, and the rate-limit headers. The service (service.py) does
the I/O around them: the client registry, the identity provider's keys, the limiter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from speechgate.core.claims import SCOPES, AccessClaims, new_jti
from speechgate.core.clients import LOCALE, ClientPolicy
from speechgate.core.settings import Settings
from speechgate.token_service import oauth
from speechgate.token_service.oauth import OAuthError, invalid_request, require
from speechgate.token_service.ratelimit import Check, Decision

GRANTS = (oauth.GRANT_CLIENT_CREDENTIALS, oauth.GRANT_TOKEN_EXCHANGE)


@dataclass(frozen=True, slots=True)
class Request:
    """What a token request asks for once its grant has given a subject."""

    scope: str
    languages: tuple[str, ...]
    single_use: bool
    lifetime_s: int


def grant_type(params: dict[str, str]) -> str:
    grant = require(params, "grant_type")
    if grant not in GRANTS:
        raise OAuthError("unsupported_grant_type", f"grant_type must be one of: {', '.join(GRANTS)}")
    return grant


def grant_label(grant: str | None) -> str:
    """The grant as a metric label: bounded, whatever the caller sent."""
    if grant == oauth.GRANT_TOKEN_EXCHANGE:
        return "token_exchange"
    if grant == oauth.GRANT_CLIENT_CREDENTIALS:
        return grant
    return "other"


def requested(policy: ClientPolicy, params: dict[str, str]) -> Request:
    return Request(
        scope=scopes(policy, params.get("scope")),
        languages=languages(policy, params.get("language")),
        single_use=oauth.parse_bool("single_use", params.get("single_use")),
        lifetime_s=oauth.parse_lifetime(params.get("expires_in"), policy.token_ttl_s),
    )


def subject_for_client(policy: ClientPolicy, params: dict[str, str]) -> str:
    """client_credentials: the client itself, or the `subject` a confidential client names."""
    if policy.public:
        raise OAuthError("unauthorized_client", "a public client may only use token exchange")
    subject = params.get("subject")
    if subject is None:
        return policy.client_id
    if not 0 < len(subject) <= 256 or not subject.isprintable():
        raise invalid_request("subject must be 1-256 printable characters")
    return subject


def subject_token(policy: ClientPolicy, params: dict[str, str], settings: Settings) -> str:
    """RFC 8693: the checks before the subject token itself is verified; returns that token."""
    if policy.idp is None:
        raise OAuthError("unauthorized_client", "this client has no identity provider for token exchange")
    if "subject" in params:
        raise invalid_request("subject is taken from the subject_token in a token exchange")
    if "actor_token" in params or "actor_token_type" in params:
        # Delegation (RFC 8693 §4.1, an `act` claim) is not offered; ignoring the actor would
        # issue a token that does not say who acts.
        raise invalid_request("actor_token is not supported: send the user's subject_token alone")
    token = require(params, "subject_token")
    token_type = require(params, "subject_token_type")
    if token_type not in oauth.SUBJECT_TOKEN_TYPES:
        raise invalid_request(
            f"subject_token_type must be one of: {', '.join(sorted(oauth.SUBJECT_TOKEN_TYPES))}"
        )
    requested_type = params.get("requested_token_type")
    if requested_type not in (None, oauth.ISSUED_TOKEN_TYPE, "urn:ietf:params:oauth:token-type:jwt"):
        raise invalid_request(f"requested_token_type must be {oauth.ISSUED_TOKEN_TYPE}")
    for name in ("audience", "resource"):
        if params.get(name) not in (None, settings.audience, settings.relay_url):
            raise OAuthError("invalid_target", f"{name} must be {settings.audience}")
    return token


def scopes(policy: ClientPolicy, requested: str | None) -> str:
    if requested is None or requested.strip() == "":
        return " ".join(policy.scopes)
    scopes = requested.split()
    denied = [s for s in scopes if s not in policy.scopes]
    if denied:
        named = " ".join(denied)
        named = named if len(named) <= 100 else named[:100] + "…"  # echo a part, not kilobytes
        raise OAuthError(
            "invalid_scope", f"scope not allowed for this client: {named}; allowed: {' '.join(policy.scopes)}"
        )
    return " ".join(dict.fromkeys(scopes))


def languages(policy: ClientPolicy, requested: str | None) -> tuple[str, ...]:
    if requested is None or requested == "":
        return policy.languages
    if not LOCALE.match(requested):
        raise invalid_request("language must be a locale such as en-US")
    if not policy.allows_language(requested):
        raise OAuthError("invalid_scope", f"language {requested} is not allowed for this client")
    return (requested,)


def claims_for(
    settings: Settings, policy: ClientPolicy, subject: str, request: Request, now: int
) -> AccessClaims:
    return AccessClaims(
        iss=settings.issuer,
        aud=settings.audience,
        sub=subject,
        client_id=policy.client_id,
        scope=request.scope,
        iat=now,
        nbf=now,
        exp=now + request.lifetime_s,
        jti=new_jti(),
        max_session_s=policy.max_session_s,
        lang=request.languages,
        single_use=request.single_use,
    )


def ratelimit_headers(checks: Sequence[Check], decision: Decision) -> dict[str, str]:
    """draft-ietf-httpapi-ratelimit-headers: the policies, and what is left of each."""
    if not checks:
        return {}
    policy = ", ".join(f'"{c.name}";q={c.amount};w={c.window_s}' for c in checks)
    state = ", ".join(
        f'"{c.name}";r={r};t={t}'
        for c, r, t in zip(checks, decision.remaining, decision.reset_s, strict=True)
    )
    return {"RateLimit-Policy": policy, "RateLimit": state}


def introspection(claims: AccessClaims) -> dict[str, Any]:
    """RFC 7662's answer for an active token: what it carries, under the names RFC 7662 and
    RFC 9068 give them, and the speechgate claims a resource server may hold it to."""
    return {
        "active": True,
        "scope": claims.scope,
        "client_id": claims.client_id,
        "sub": claims.sub,
        "token_type": "Bearer",
        "exp": claims.exp,
        "iat": claims.iat,
        "nbf": claims.nbf,
        "iss": claims.iss,
        "aud": claims.aud,
        "jti": claims.jti,
        "lang": list(claims.lang),
        "max_session_s": claims.max_session_s,
        "single_use": claims.single_use,
    }


def metadata(settings: Settings) -> dict[str, Any]:
    """RFC 8414 authorization server metadata."""
    base = settings.issuer.rstrip("/")
    return {
        "issuer": settings.issuer,
        "token_endpoint": f"{base}/v1/token",
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "revocation_endpoint": f"{base}/v1/revoke",
        "introspection_endpoint": f"{base}/v1/introspect",
        "grant_types_supported": list(GRANTS),
        # RFC 8414 requires the list. No authorization endpoint: no response type returns a
        # credential, which is what "none" says (OAuth 2.0 Multiple Response Type Encoding).
        "response_types_supported": ["none"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "introspection_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "none",
        ],
        "scopes_supported": list(SCOPES),
        "service_documentation": f"{base}/openapi.json",
    }
