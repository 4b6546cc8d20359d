"""Logging for both services: one JSON object per line in production, plain text at a terminal.

Structured fields go in `extra={"fields": {...}}`; the JSON formatter merges them into the line.
What goes in a field is chosen by the caller, and callers never pass a token, key or secret (the
tests scan the logs for them). `access_log` is the token service's one line per request.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

FORMATS = ("auto", "json", "text")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
access = logging.getLogger("speechgate.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """The usual text line, with the structured fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def configure(level: str = "info", fmt: str = "auto") -> None:
    """`auto`: JSON unless stderr is a terminal (containers and log shippers get JSON)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per outgoing request is noise
    # uvicorn's own loggers would print in their format: route them through ours.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-Id when it is a sane one (for tracing across services), else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.match(text):
                return text
    return uuid.uuid4().hex


class AccessLog:
    """ASGI middleware: one line per request with its id, route, status, client, outcome, duration.
    Handlers put `client_id` and `outcome` in `request.state`; the query is never logged."""

    def __init__(self, app: ASGIApp, on_done: Any = None) -> None:
        self.app = app
        self.on_done = on_done  # called with (path, status) for the request metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id(scope.get("headers", []))
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                headers.append((b"x-request-id", rid.encode()))
                headers.append((b"x-content-type-options", b"nosniff"))  # the Content-Type, as said
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            if self.on_done is not None:
                self.on_done(path, status)
            access.info(
                "request",
                extra={
                    "fields": {
                        "event": "request",
                        "request_id": rid,
                        "method": scope.get("method"),
                        "path": path,
                        "status": status,
                        "client": state.get("client_id"),
                        "outcome": state.get("outcome"),
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    }
                },
            )
