"""A local identity provider for the token-exchange tests: a real HTTP server serving a JWKS,
plus the signing keys to mint its ID tokens. Its behaviour is switchable: rotate keys, fail."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ISSUER = "https://login.example.test/tenant"
AUDIENCE = "mobile-app"


@dataclass
class FakeIdp:
    keys: dict[str, Any] = field(default_factory=dict)  # kid -> private key
    extra_jwks: list[dict[str, Any]] = field(default_factory=list)
    failing: bool = False
    fetches: int = 0
    flood_bytes: int = 0  # serve a JWKS this large, made as it is read (a hostile or broken IdP)
    served_bytes: int = 0
    trickle_s: float = 0.0  # serve the JWKS a byte at a time, this far apart (a stalling IdP)

    def add_rsa_key(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def add_ec_key(self, kid: str) -> None:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> dict[str, Any]:
        published = []
        for kid, key in self.keys.items():
            alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
            algorithm = jwt.get_algorithm_by_name(alg)
            jwk = json.loads(algorithm.to_jwk(key.public_key()))
            published.append({**jwk, "kid": kid, "use": "sig", "alg": alg})
        return {"keys": published + self.extra_jwks}

    def id_token(
        self, kid: str, alg: str | None = None, headers: dict[str, Any] | None = None, **claims: Any
    ) -> str:
        key = self.keys[kid]
        alg = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1234", "iat": now, "exp": now + 600, **claims}
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid, **(headers or {})})

    async def _flood(self, request: Request) -> AsyncIterator[bytes]:
        """Counts what it makes while the reader is there (once it has gone, writes go nowhere)."""
        chunk = b" " * 65536
        yield b'{"keys": ['
        while self.served_bytes < self.flood_bytes and not await request.is_disconnected():
            self.served_bytes += len(chunk)
            yield chunk
        yield b"]}"

    async def _trickle(self, request: Request) -> AsyncIterator[bytes]:
        for byte in json.dumps(self.jwks()).encode():
            if await request.is_disconnected():
                return
            yield bytes([byte])
            await asyncio.sleep(self.trickle_s)  # the stall this fake plays, not a synchronisation

    def app(self) -> Starlette:
        async def jwks(request: Request) -> Response:
            self.fetches += 1
            if self.failing:
                return Response("unavailable", status_code=503)
            if self.flood_bytes:
                return StreamingResponse(self._flood(request), media_type="application/json")
            if self.trickle_s:
                return StreamingResponse(self._trickle(request), media_type="application/json")
            return JSONResponse(self.jwks())

        return Starlette(routes=[Route("/jwks", jwks)])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature)])
