"""Plain HTTP answers beside the WebSocket endpoints: refusals, health, metrics, the dev demo."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

# Plain HTTP pages served beside the WebSocket endpoints (the dev demo).
Route = Callable[[ServerConnection, Request], Awaitable[Response]]


def respond(connection: ServerConnection, status: int, text: str, content_type: str) -> Response:
    """A plain HTTP answer. websockets' `respond` sets a text/plain Content-Type, and its headers
    keep every value assigned: replace it, so that the answer has exactly one."""
    response = connection.respond(HTTPStatus(status), text)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    return response


def json_response(
    connection: ServerConnection, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    """A plain HTTP answer with a JSON body (refusals, health, the dev demo's token)."""
    response = respond(connection, status, json.dumps(body) + "\n", "application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def asks_for_upgrade(request: Request) -> bool:
    """Whether a request asks to become a WebSocket: nothing is admitted for one that does not
    (websockets checks the rest of the handshake; `Relay.after_handshake` undoes an admission
    when it fails)."""
    connection = header(request, "Connection").lower()
    return "upgrade" in connection and header(request, "Upgrade").lower() == "websocket"


def header(request: Request, name: str) -> str:
    """A request header's values, joined: a header sent twice is no error (websockets' `get`
    raises on it, which would become a 500)."""
    return ", ".join(request.headers.get_all(name))
