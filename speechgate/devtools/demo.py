"""The browser demo `speechgate dev` serves on the relay: `/demo` and its token route.

The page never sees the client secret. `/demo/token` plays the part of an app's backend: it holds
the dev client's credentials and asks the token service for a short-lived token, which the page
then presents to `/v1/listen`. It answers loopback callers only, as the demo is for this machine.
"""

from __future__ import annotations

import ipaddress
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from speechgate.devtools.dev import DevClient
from speechgate.relay.http import Route, header, json_response, respond

PAGE_PATH = "/demo"
MINT_PATH = "/demo/token"


NO_STORE = {"Cache-Control": "no-store"}


def _json(connection: ServerConnection, status: int, body: dict[str, Any]) -> Response:
    return json_response(connection, status, body, NO_STORE)


def _loopback(connection: ServerConnection) -> bool:
    host = connection.remote_address[0] if connection.remote_address else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _loopback_page(request: Request) -> bool:
    """Asked for by a page of this machine: a web page elsewhere whose name was made to resolve
    to 127.0.0.1 (DNS rebinding) sends its own name in Host, and a page of another site sends
    its origin; the demo's own page sends loopback names in both (or no Origin, same-origin)."""
    origin = header(request, "Origin") or None
    try:
        host = urlsplit("http://" + header(request, "Host")).hostname
        page = urlsplit(origin) if origin is not None else None
    except ValueError:  # not a host name at all
        return False
    if host not in LOOPBACK_HOSTS:
        return False
    return page is None or (page.scheme == "http" and page.hostname in LOOPBACK_HOSTS)


def demo_routes(client: DevClient, token_url: str, http: httpx.AsyncClient) -> dict[str, Route]:
    page = resources.files("speechgate.devtools").joinpath("demo.html").read_text(encoding="utf-8")

    async def show_page(connection: ServerConnection, request: Request) -> Response:
        response = respond(connection, 200, page, "text/html; charset=utf-8")
        response.headers.update(NO_STORE)
        # Only this page's own script, and WebSockets back to where it came from.
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'self' 'unsafe-inline' blob:; style-src 'unsafe-inline'; "
            "connect-src 'self' ws: wss:; worker-src blob:"
        )
        return response

    async def get_token(connection: ServerConnection, request: Request) -> Response:
        if not (_loopback(connection) and _loopback_page(request)):
            return _json(connection, 403, {"error": "forbidden", "message": "the demo is for this machine"})
        try:
            answer = await http.post(
                f"{token_url}/v1/token",
                data={"grant_type": "client_credentials", "subject": "demo-user"},
                auth=(client.client_id, client.client_secret),
                timeout=10,
            )
        except httpx.HTTPError:
            return _json(
                connection, 502, {"error": "token_service", "message": "the token service is not up"}
            )
        body = answer.json()
        if answer.status_code != 200:
            return _json(
                connection,
                502,
                {"error": body.get("error", "token_service"), "message": body.get("error_description", "")},
            )
        return _json(
            connection, 200, {"access_token": body["access_token"], "expires_in": body["expires_in"]}
        )

    return {PAGE_PATH: show_page, MINT_PATH: get_token}
