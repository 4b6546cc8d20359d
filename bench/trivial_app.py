"""The benchmark's baseline: a trivial Starlette JSON endpoint under the same server settings."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def hello(request: Request) -> Response:
    await request.body()
    return JSONResponse({"hello": "world"})


app = Starlette(routes=[Route("/", hello, methods=["GET", "POST"])])
