"""The voices list the SDKs fetch with the same token (`getVoicesAsync` in JavaScript, `get_voices_async`
in the native SDKs): `GET /cognitiveservices/voices/list`, answered from Azure's list.

Azure's list is large (hundreds of voices, about 1 MiB) and changes a few times a year, so the
relay keeps it for ten minutes: a thousand apps starting at once cost Azure one request. When Azure
cannot be reached the last list is served on; with none yet, the answer is 503 and a retry time.
A token that restricts languages sees only the voices of its languages.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from speechgate.core.settings import Settings
from speechgate.relay.languages import allows, restricts
from speechgate.relay.upstream import Credentials, UpstreamError, upstream_url

VOICES_PATHS = frozenset({"/cognitiveservices/voices/list", "/tts/cognitiveservices/voices/list"})
CACHE_S = 600.0
STALE_RETRY_S = 30.0  # Azure refused: serve the last list, and ask again after this
MAX_LIST_BYTES = 8 * 2**20  # Azure's is about 1 MiB


def voices_url(settings: Settings) -> str:
    """The list's REST URL: the synthesis host of the region or the configured endpoint."""
    url = upstream_url(settings, "tts", "/cognitiveservices/voices/list", "")
    return url.replace("wss://", "https://", 1).replace("ws://", "http://", 1)


def for_token(voices: list[dict[str, Any]], lang: tuple[str, ...]) -> list[dict[str, Any]]:
    """The voices a token may use: all, or those of its languages."""
    if not restricts(lang):
        return voices
    return [v for v in voices if allows(lang, str(v.get("Locale", "")))]


class VoiceList:
    """Azure's voices, fetched at most once per `ttl` (one fetch at a time), kept through outages."""

    def __init__(
        self, settings: Settings, credentials: Credentials, http: httpx.AsyncClient, ttl: float = CACHE_S
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        self.http = http
        self.ttl = ttl
        self.fetches = 0
        self._voices: list[dict[str, Any]] | None = None
        self._fresh_until = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> list[dict[str, Any]]:
        async with self._lock:
            if self._voices is None or time.monotonic() >= self._fresh_until:
                try:
                    self._voices = await self._fetch()
                    self._fresh_until = time.monotonic() + self.ttl
                except UpstreamError:
                    if self._voices is None:
                        raise
                    self._fresh_until = time.monotonic() + STALE_RETRY_S
            return self._voices

    async def _fetch(self) -> list[dict[str, Any]]:
        self.fetches += 1
        try:
            async with self.http.stream(
                "GET", voices_url(self.settings), headers=await self.credentials.headers(), timeout=10
            ) as response:
                if response.status_code != 200:
                    if response.status_code == 401:
                        self.credentials.invalidate()
                    raise UpstreamError(f"Azure answered the voices list with {response.status_code}", True)
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_LIST_BYTES:
                        raise UpstreamError("Azure's voices list is larger than expected", True)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"the voices list cannot be fetched: {type(exc).__name__}", True) from None
        try:
            voices = json.loads(body)
        except ValueError:
            raise UpstreamError("Azure's voices list is not JSON", True) from None
        if not isinstance(voices, list) or not all(isinstance(v, dict) for v in voices):
            raise UpstreamError("Azure's voices list is not a list of voices", True)
        return voices
