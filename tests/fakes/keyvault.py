"""A local Azure Key Vault for the tests, built from the Key Vault secrets REST API's reference.

It speaks the secrets REST API over HTTPS (a trustme CA), answers the bearer challenge like the
service, checks that every request carries a token its identity endpoint issued, pages listings,
and can be told to fail: down (503), throttling (429 with Retry-After), or refusing (401/403).
Also here: the App Service managed-identity endpoint that DefaultAzureCredential talks to.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CHALLENGE = (
    f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", resource="https://vault.azure.net"'
)


@dataclass
class Version:
    value: str
    version: str
    tags: dict[str, str]
    content_type: str | None
    enabled: bool = True
    created: int = field(default_factory=lambda: int(time.time()))
    updated: int = field(default_factory=lambda: int(time.time()))


@dataclass
class FakeKeyVault:
    secrets: dict[str, list[Version]] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)  # issued by the identity endpoint
    identity_header: str = field(default_factory=lambda: secrets.token_hex(8))
    fail_with: int | None = None  # every secrets request answers this status while set
    page_size: int = 2
    requests: int = 0

    # --- the identity endpoint (App Service managed identity) ------------------------------

    def identity_app(self) -> Starlette:
        async def token(request: Request) -> Response:
            if request.headers.get("x-identity-header") != self.identity_header:
                return JSONResponse({"error": "invalid header"}, status_code=401)
            issued = secrets.token_urlsafe(24)
            self.tokens.add(issued)
            return JSONResponse(
                {
                    "access_token": issued,
                    "expires_on": str(int(time.time()) + 3600),
                    "resource": request.query_params.get("resource", ""),
                    "token_type": "Bearer",
                }
            )

        return Starlette(routes=[Route("/msi/token", token)])

    # --- the vault ---------------------------------------------------------------------------

    def _bundle(self, request: Request, name: str, item: Version, with_value: bool) -> dict[str, Any]:
        bundle: dict[str, Any] = {
            "id": f"https://{request.headers['host']}/secrets/{name}/{item.version}",
            "contentType": item.content_type,
            "tags": item.tags,
            "attributes": {
                "enabled": item.enabled,
                "created": item.created,
                "updated": item.updated,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
            },
        }
        if with_value:
            bundle["value"] = item.value
        return bundle

    @staticmethod
    def _error(status: int, code: str, message: str, inner: str | None = None) -> JSONResponse:
        error: dict[str, Any] = {"code": code, "message": message}
        if inner:
            error["innererror"] = {"code": inner}
        return JSONResponse({"error": error}, status_code=status)

    def app(self) -> Starlette:
        async def guard(request: Request) -> Response | None:
            self.requests += 1
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer "):
                return Response(status_code=401, headers={"WWW-Authenticate": CHALLENGE})
            if "api-version" not in request.query_params:
                return self._error(400, "BadParameter", "api-version is required")
            if self.fail_with is not None:
                headers = {"Retry-After": "1"} if self.fail_with == 429 else {}
                response = self._error(self.fail_with, "Injected", "failure injected by the test")
                response.headers.update(headers)
                return response
            if auth.removeprefix("Bearer ") not in self.tokens:
                return self._error(401, "Unauthorized", "token not issued by this tenant")
            return None

        def find(name: str, version: str | None) -> Version | Response:
            items = self.secrets.get(name.lower())
            if not items:
                return self._error(404, "SecretNotFound", f"A secret with (name/id) {name} was not found")
            if version is None:
                return items[-1]
            for item in items:
                if item.version == version:
                    return item
            return self._error(
                404, "SecretNotFound", f"A secret with (name/id) {name}/{version} was not found"
            )

        async def put_secret(request: Request) -> Response:
            if (refused := await guard(request)) is not None:
                return refused
            name = request.path_params["name"]
            body = await request.json()
            item = Version(
                value=body["value"],
                version=secrets.token_hex(16),
                tags=body.get("tags") or {},
                content_type=body.get("contentType"),
                enabled=body.get("attributes", {}).get("enabled", True),
            )
            self.secrets.setdefault(name.lower(), []).append(item)
            return JSONResponse(self._bundle(request, name, item, True))

        async def get_secret(request: Request) -> Response:
            if (refused := await guard(request)) is not None:
                return refused
            name = request.path_params["name"]
            found = find(name, request.path_params.get("version") or None)
            if isinstance(found, Response):
                return found
            if not found.enabled:
                return self._error(
                    403, "Forbidden", "Operation get is not allowed on a disabled secret.", "SecretDisabled"
                )
            return JSONResponse(self._bundle(request, name, found, True))

        async def patch_secret(request: Request) -> Response:
            if (refused := await guard(request)) is not None:
                return refused
            name = request.path_params["name"]
            found = find(name, request.path_params.get("version") or None)
            if isinstance(found, Response):
                return found
            body = await request.json()
            if "enabled" in body.get("attributes", {}):
                found.enabled = bool(body["attributes"]["enabled"])
            if body.get("tags") is not None:
                found.tags = dict(body["tags"])
            found.updated = int(time.time())
            return JSONResponse(self._bundle(request, name, found, False))

        def page(request: Request, items: list[dict[str, Any]], path: str) -> Response:
            start = int(request.query_params.get("$skiptoken", "0"))
            chunk = items[start : start + self.page_size]
            more = start + self.page_size < len(items)
            version = request.query_params["api-version"]
            next_link = (
                (
                    f"https://{request.headers['host']}{path}?api-version={version}"
                    f"&$skiptoken={start + self.page_size}"
                )
                if more
                else None
            )
            return JSONResponse({"value": chunk, "nextLink": next_link})

        async def list_versions(request: Request) -> Response:
            if (refused := await guard(request)) is not None:
                return refused
            name = request.path_params["name"]
            items = self.secrets.get(name.lower(), [])
            # No promised order, as in the service: newest first here.
            bundles = [self._bundle(request, name, v, False) for v in reversed(items)]
            return page(request, bundles, f"/secrets/{name}/versions")

        async def list_secrets(request: Request) -> Response:
            if (refused := await guard(request)) is not None:
                return refused
            bundles = []
            for name, items in sorted(self.secrets.items()):
                bundle = self._bundle(request, name, items[-1], False)
                bundle["id"] = bundle["id"].rsplit("/", 1)[0]
                bundles.append(bundle)
            return page(request, bundles, "/secrets")

        return Starlette(
            routes=[
                Route("/secrets", list_secrets, methods=["GET"]),
                Route("/secrets/{name}", put_secret, methods=["PUT"]),
                Route("/secrets/{name}/versions", list_versions, methods=["GET"]),
                Route("/secrets/{name}/", get_secret, methods=["GET"]),
                Route("/secrets/{name}/", patch_secret, methods=["PATCH"]),
                Route("/secrets/{name}/{version}", get_secret, methods=["GET"]),
                Route("/secrets/{name}/{version}", patch_secret, methods=["PATCH"]),
            ]
        )
