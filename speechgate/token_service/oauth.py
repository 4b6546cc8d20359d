"""OAuth 2.0 request and error handling without I/O: bytes and headers in, parameters or an
`OAuthError` out (RFC 6749 §2.3.1, §3.2, §5.2; RFC 7009; RFC 8693).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote_plus

from speechgate.core.jose import DuplicateMember, loads_strict

GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
SUBJECT_TOKEN_TYPES = frozenset(
    {
        "urn:ietf:params:oauth:token-type:id_token",
        "urn:ietf:params:oauth:token-type:access_token",
        "urn:ietf:params:oauth:token-type:jwt",
    }
)
ISSUED_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
MAX_PARAMETERS = 32
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(Exception):
    """An RFC 6749 §5.2 error response. The description says what to fix and holds no secret."""

    def __init__(
        self,
        error: str,
        description: str,
        status: int = 400,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status
        self.headers = dict(headers or {})

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


def invalid_request(description: str, status: int = 400) -> OAuthError:
    return OAuthError("invalid_request", description, status)


def invalid_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, 401, {"WWW-Authenticate": 'Basic realm="speechgate"'})


def parse_body(content_type: str | None, body: bytes) -> dict[str, str]:
    """The request's parameters, from a form-encoded or JSON body; each name at most once."""
    if not body and content_type is None:
        return {}  # nothing sent at all: report the missing parameters, not the media type
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in ("application/x-www-form-urlencoded", "application/json"):
        raise invalid_request(
            "Content-Type must be application/x-www-form-urlencoded or application/json", 415
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_request("the request body is not valid UTF-8") from None
    if media == "application/json":
        return _json_parameters(text)
    try:
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=bool(text),
            max_num_fields=MAX_PARAMETERS,
            errors="strict",
        )
    except (ValueError, UnicodeDecodeError):
        raise invalid_request("the request body is not valid form encoding (name=value&...)") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise invalid_request(f"parameter {name!r} is repeated; send it once")
        params[name] = value
    return params


def _json_parameters(text: str) -> dict[str, str]:
    try:
        doc = loads_strict(text)
    except DuplicateMember:
        raise invalid_request("a JSON member is repeated; send each parameter once") from None
    except ValueError:
        raise invalid_request("the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise invalid_request("the JSON body must be an object of parameters")
    if len(doc) > MAX_PARAMETERS:
        raise invalid_request(f"too many parameters (at most {MAX_PARAMETERS})")
    params: dict[str, str] = {}
    for name, value in doc.items():
        # A JSON client writes numbers and booleans as such ("expires_in": 60): they are read as
        # the form parameter their JSON text spells, and checked as it is.
        if isinstance(value, bool | int | float):
            value = json.dumps(value)  # true, false, 60
        if not isinstance(value, str):
            raise invalid_request(f"parameter {name!r} must be a string, a number or a boolean")
        params[name] = value
    return params


def client_credentials(authorization: str | None, params: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(client_id, client_secret) from HTTP Basic or the body; using both is an error."""
    form_id, form_secret = params.get("client_id"), params.get("client_secret")
    if authorization is None:
        return form_id, form_secret
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise invalid_client("use HTTP Basic authentication or client_id/client_secret in the body")
    if form_secret is not None:
        raise invalid_request("send client credentials once: in the Authorization header or the body")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise invalid_client("the Basic credentials are not valid base64 of 'id:secret'") from None
    raw_id, sep, raw_secret = decoded.partition(":")
    if not sep:
        raise invalid_client("the Basic credentials are not of the form 'id:secret'")
    # RFC 6749 §2.3.1: both parts are form-urlencoded before base64.
    client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
    if form_id is not None and form_id != client_id:
        raise invalid_request("client_id in the body differs from the Basic credentials")
    return client_id, secret


def parse_bool(name: str, value: str | None) -> bool:
    if value is None or value == "":
        return False
    lowered = value.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise invalid_request(f"{name} must be true or false")


def parse_lifetime(value: str | None, longest: int) -> int:
    """The token lifetime the app asked for (`expires_in`, seconds): shorter than the client's
    own, never longer; the client's when not asked."""
    if value is None or value == "":
        return longest
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= longest:
        raise invalid_request(f"expires_in must be a whole number of seconds from 1 to {longest}")
    return int(value)


def require(params: Mapping[str, str], name: str) -> str:
    value = params.get(name)
    if not value:
        raise invalid_request(f"missing required parameter {name!r}")
    return value
