"""The token service's OpenAPI 3.1 document, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from speechgate.core.settings import Settings

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "string",
            "enum": [
                "invalid_request",
                "invalid_client",
                "invalid_grant",
                "invalid_scope",
                "invalid_target",
                "unauthorized_client",
                "unsupported_grant_type",
                "slow_down",
                "temporarily_unavailable",
                "server_error",
            ],
        },
        "error_description": {"type": "string"},
    },
}

_TOKEN_REQUEST = {
    "type": "object",
    "required": ["grant_type"],
    "properties": {
        "grant_type": {
            "type": "string",
            "enum": ["client_credentials", "urn:ietf:params:oauth:grant-type:token-exchange"],
        },
        "client_id": {"type": "string"},
        "client_secret": {"type": "string", "description": "or HTTP Basic"},
        "scope": {"type": "string", "example": "speech:recognize"},
        "language": {"type": "string", "example": "en-US"},
        "single_use": {"type": "string", "enum": ["true", "false"]},
        "expires_in": {
            "type": "string",
            "pattern": "^[0-9]+$",
            "description": "seconds the token may open streams, at most the client's token_ttl_s",
        },
        "subject": {"type": "string", "description": "client_credentials: the backend's own user id"},
        "subject_token": {"type": "string", "description": "token exchange: the IdP's ID or access token"},
        "subject_token_type": {"type": "string"},
    },
    # OAuth parameters are strings; unknown ones are ignored (RFC 6749 §3.1).
    "additionalProperties": {"type": "string"},
}


def _error_responses(*codes: str) -> dict[str, Any]:
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {code: {"description": "error (RFC 6749 §5.2)", "content": ref} for code in codes}


# What /v1/revoke and /v1/introspect take: a token, and the hint RFC 7009 and RFC 7662 allow.
_TOKEN_FORM: dict[str, Any] = {
    "required": True,
    "content": {
        "application/x-www-form-urlencoded": {
            "schema": {
                "type": "object",
                "required": ["token"],
                "properties": {"token": {"type": "string"}, "token_type_hint": {"type": "string"}},
                "additionalProperties": {"type": "string"},
            }
        }
    },
}


def openapi_document(settings: Settings) -> dict[str, Any]:
    form = {
        "application/x-www-form-urlencoded": {"schema": {"$ref": "#/components/schemas/TokenRequest"}},
        "application/json": {"schema": {"$ref": "#/components/schemas/TokenRequest"}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "speechgate token service", "version": "1"},
        "servers": [{"url": settings.issuer}],
        "paths": {
            "/v1/token": {
                "post": {
                    "summary": "Get a short-lived access token for the relay (RFC 6749, RFC 8693)",
                    "requestBody": {"required": True, "content": form},
                    "responses": {
                        "200": {
                            "description": "a token",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/Token"}}
                            },
                        },
                        **_error_responses("400", "401", "413", "415", "429", "503"),
                    },
                }
            },
            "/v1/revoke": {
                "post": {
                    "summary": "Revoke an access token (RFC 7009)",
                    "requestBody": _TOKEN_FORM,
                    "responses": {
                        "200": {"description": "revoked, or not a valid token"},
                        **_error_responses("400", "401", "503"),
                    },
                }
            },
            "/v1/introspect": {
                "post": {
                    "summary": "Introspect an access token (RFC 7662): of the tokens issued to the caller",
                    "requestBody": _TOKEN_FORM,
                    "responses": {
                        "200": {
                            "description": "whether the token is active, and what it carries if it is",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/Introspection"}}
                            },
                        },
                        **_error_responses("400", "401", "413", "415", "429", "503"),
                    },
                }
            },
            "/.well-known/jwks.json": {
                "get": {"summary": "Public signing keys", "responses": {"200": {"description": "JWKS"}}}
            },
            "/.well-known/oauth-authorization-server": {
                "get": {"summary": "RFC 8414 metadata", "responses": {"200": {"description": "metadata"}}}
            },
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {
                "get": {
                    "summary": "Readiness: keys loaded; 'degraded' while Redis or the key store is down",
                    "responses": {
                        "200": {"description": "ready or degraded"},
                        "503": {"description": "not ready"},
                    },
                }
            },
            "/metrics": {
                "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "metrics"}}}
            },
        },
        "components": {
            "schemas": {
                "Error": _ERROR,
                "TokenRequest": _TOKEN_REQUEST,
                "Token": {
                    "type": "object",
                    "required": ["access_token", "token_type", "expires_in", "scope", "relay_url"],
                    "properties": {
                        "access_token": {"type": "string"},
                        "token_type": {"type": "string", "enum": ["Bearer"]},
                        "expires_in": {"type": "integer"},
                        "scope": {"type": "string"},
                        "relay_url": {"type": "string"},
                        "issued_token_type": {"type": "string"},
                    },
                },
                "Introspection": {
                    "type": "object",
                    "required": ["active"],
                    "properties": {
                        "active": {"type": "boolean"},
                        "scope": {"type": "string"},
                        "client_id": {"type": "string"},
                        "sub": {"type": "string"},
                        "token_type": {"type": "string", "enum": ["Bearer"]},
                        "exp": {"type": "integer"},
                        "iat": {"type": "integer"},
                        "nbf": {"type": "integer"},
                        "iss": {"type": "string"},
                        "aud": {"type": "string"},
                        "jti": {"type": "string"},
                        "lang": {"type": "array", "items": {"type": "string"}},
                        "max_session_s": {"type": "integer"},
                        "single_use": {"type": "boolean"},
                    },
                },
            }
        },
    }
