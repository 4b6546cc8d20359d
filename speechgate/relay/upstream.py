"""The way to Azure Speech: which URL, with which credentials, retried with backoff.

Credentials, chosen by configuration (`SPEECHGATE_UPSTREAM_AUTH`):
- `key`: the subscription key (the store's `speechgate-speech-key`, or `SPEECH_KEY` in development)
  as `Ocp-Apim-Subscription-Key`;
- `sts`: a token the region's STS issues for that key, renewed a minute before its 10 minutes end;
- `entra`: keyless Microsoft Entra ID through azure-identity, as `Bearer aad#<resource id>#<token>`.
A reload event or an upstream 401 makes the next connection read the key again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from typing import Any, Protocol

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

from speechgate.core.settings import Settings
from speechgate.core.speechkeys import SPEECH_KEY_SECRET, sts_token_url
from speechgate.core.store import SecretNotFound, SecretStore, StoreError

log = logging.getLogger("speechgate.relay.upstream")
_ws_log = logging.getLogger("speechgate.relay.upstream.websockets")
_ws_log.setLevel(logging.INFO)  # its DEBUG lines hold URLs and headers (the key)


class UpstreamError(Exception):
    """Azure could not be reached or refused us; `retryable` says whether trying later may help."""

    def __init__(self, message: str, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


HUNG = "no answer to pings"


def hung(connection: ClientConnection) -> bool:
    """Whether the relay closed this upstream connection because its pings went unanswered."""
    sent = connection.protocol.close_sent
    return sent is not None and sent.code == 1011 and sent.reason == "keepalive ping timeout"


def upstream_url(settings: Settings, service: str, path: str, query: str) -> str:
    """Azure's URL for a path of `service` ("stt", "tts", "s2s": the region's host for it), or the
    configured endpoint (a custom domain, a sovereign cloud, a local fake) for every service."""
    if settings.speech_endpoint:
        base = settings.speech_endpoint.rstrip("/")
    elif settings.speech_region:
        base = f"wss://{settings.speech_region}.{service}.speech.microsoft.com"
    else:
        raise UpstreamError("no upstream configured: set SPEECH_REGION or SPEECHGATE_SPEECH_ENDPOINT", False)
    return f"{base}{path}" + (f"?{query}" if query else "")


class Credentials(Protocol):
    async def headers(self) -> dict[str, str]: ...

    def invalidate(self) -> None: ...

    async def aclose(self) -> None: ...


class KeyCredentials:
    """The subscription key, read from the store (or SPEECH_KEY) and kept until invalidated."""

    def __init__(self, store: SecretStore, fallback_key: str | None, secret: str = SPEECH_KEY_SECRET) -> None:
        self.store = store
        self.fallback_key = fallback_key
        self.secret = secret
        self._key: str | None = None

    async def key(self) -> str:
        if self._key is None:
            try:
                self._key = (await self.store.get(self.secret)).value
            except SecretNotFound:
                self._key = self.fallback_key
            except StoreError:
                if self.fallback_key is None:
                    raise UpstreamError("the Azure Speech key cannot be read from the store", True) from None
                self._key = self.fallback_key
        if not self._key:
            raise UpstreamError(
                "no Azure Speech key: set SPEECH_KEY or run `speechgate keys rotate-speech`", False
            )
        return self._key

    async def headers(self) -> dict[str, str]:
        return {"Ocp-Apim-Subscription-Key": await self.key()}

    def invalidate(self) -> None:
        self._key = None

    async def aclose(self) -> None:
        return None


class StsCredentials:
    """A 10-minute STS token exchanged from the key, renewed at 9 minutes."""

    def __init__(self, key: KeyCredentials, sts_base: str, http: httpx.AsyncClient) -> None:
        self.key_source = key
        self.url = sts_token_url(sts_base)
        self.http = http
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    async def headers(self) -> dict[str, str]:
        async with self._lock:
            if self._token is None or time.monotonic() >= self._renew_at:
                response = await self.http.post(self.url, headers=await self.key_source.headers(), timeout=10)
                if response.status_code != 200:
                    self.key_source.invalidate()
                    raise UpstreamError(
                        f"STS refused the key ({response.status_code})", response.status_code >= 500
                    )
                self._token, self._renew_at = response.text, time.monotonic() + 540
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> None:
        self._token = None
        self.key_source.invalidate()

    async def aclose(self) -> None:
        return None


class EntraCredentials:
    """Keyless: a Microsoft Entra ID token from azure-identity (managed or workload identity),
    sent as `Bearer aad#<resource id>#<token>`, which is what Azure Speech expects over WebSocket."""

    SCOPE = "https://cognitiveservices.azure.com/.default"

    def __init__(self, resource_id: str, credential: Any = None) -> None:
        from azure.identity.aio import DefaultAzureCredential

        self.resource_id = resource_id
        self.credential = credential or DefaultAzureCredential()

    async def headers(self) -> dict[str, str]:
        try:
            token = await self.credential.get_token(self.SCOPE)  # cached by azure-identity until near expiry
        except Exception as exc:  # azure-identity raises several kinds; none may reach the app
            raise UpstreamError(f"no Entra ID token for Azure Speech ({type(exc).__name__})", True) from None
        return {"Authorization": f"Bearer aad#{self.resource_id}#{token.token}"}

    def invalidate(self) -> None:
        return None  # azure-identity renews its tokens itself

    async def aclose(self) -> None:
        await self.credential.close()


def _detail(body: bytes | bytearray | None) -> str:
    """The first line of a refusal's body, short and printable, for the app's close reason."""
    lines = (body or b"").decode("utf-8", "replace").strip().splitlines()
    line = lines[0] if lines else ""
    return line[:80] if line.isprintable() else ""


async def open_upstream(
    url: str,
    credentials: Credentials,
    extra: Mapping[str, str],
    attempts: int,
    max_size: int,
    ping_s: float | None = None,
) -> ClientConnection:
    """Connect, retrying refusals that may pass (5xx, 429, network) with backoff and jitter.
    `ping_s`: websockets pings the upstream that often and fails the connection (1011, "keepalive
    ping timeout": `hung`) when a ping goes unanswered as long."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            headers = {**await credentials.headers(), **extra}
            return await connect(
                url,
                additional_headers=headers,
                subprotocols=None,
                compression=None,
                max_size=max_size,
                open_timeout=10,
                ping_interval=ping_s,
                ping_timeout=ping_s,
                close_timeout=ping_s or 10,  # a hung upstream answers no close either
                user_agent_header=None,
                logger=_ws_log,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                credentials.invalidate()  # a rotated key: read it again before the next try
            retryable = status in (401, 408, 429) or status >= 500
            detail = _detail(exc.response.body)
            error = UpstreamError(
                f"refused with {status}{': ' + detail if detail else ''}",  # short: it ends in a close reason
                retryable,
                status,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            error = UpstreamError(f"unreachable ({type(exc).__name__})", True)
        if not error.retryable or attempt == attempts:
            raise error
        log.warning("upstream attempt %d failed: %s; retrying", attempt, error)
        await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto
        delay *= 2
    raise AssertionError("unreachable")
