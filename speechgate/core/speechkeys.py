"""The Azure Speech key: dual-key rotation that never breaks a stream.

An Azure Speech resource has two keys, `key1` and `key2`; both are valid at once. The store
holds the one in use as the newest version of `speechgate-speech-key`, tagged with its `slot`.
Rotating regenerates the slot *not* in use (nobody uses it), stores it as the new version, and
tells the relays to reload; the old key stays valid at Azure until the next rotation, so streams
that still hold it keep working.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from speechgate.core.store import SecretNotFound, SecretStore, SecretVersion, StoreError

SPEECH_KEY_SECRET = "speechgate-speech-key"  # noqa: S105 - a secret name
SLOTS = ("key1", "key2")
_KEY = re.compile(r"^[A-Za-z0-9]{32,128}$")


class SpeechKeyError(StoreError):
    """A rotation step failed; nothing that was stored before is lost."""


def other_slot(slot: str) -> str:
    return "key2" if slot == "key1" else "key1"


def check_key_format(key: str) -> str:
    key = key.strip()
    if not _KEY.match(key):
        raise SpeechKeyError("that does not look like an Azure Speech key (32-128 letters and digits)")
    return key


async def current(store: SecretStore, secret: str = SPEECH_KEY_SECRET) -> SecretVersion | None:
    try:
        return await store.get(secret)
    except SecretNotFound:
        return None


@dataclass(frozen=True)
class SpeechRotation:
    slot: str
    version: str
    finished_previous: bool  # True when this run only finished an interrupted rotation


async def rotate_speech_key(
    store: SecretStore,
    new_key: Callable[[str], Awaitable[str]],
    announce: Callable[[], Awaitable[None]],
    *,
    rotated_by: str,
    verify: Callable[[str], Awaitable[None]] | None = None,
    tags: dict[str, str] | None = None,
    secret: str = SPEECH_KEY_SECRET,
) -> SpeechRotation:
    """Regenerate the slot not in use (`new_key(slot)`), optionally `verify` it, store it, announce.

    The new version is stored tagged `announced=false` and retagged once the reload event went
    out: a run interrupted in between is finished by the next one (announce again), which never
    regenerates the slot the relays may still be using.
    """
    latest = await current(store, secret)
    if latest is not None and latest.tags.get("announced") == "false":
        await announce()
        await store.update(secret, latest.version, tags={**latest.tags, "announced": "true"})
        return SpeechRotation(latest.tags.get("slot", "key1"), latest.version, True)
    if latest is not None and latest.tags.get("slot") not in SLOTS:
        raise SpeechKeyError(
            f"the stored speech key {secret} (version {latest.version}) has no slot tag, so the slot "
            "in use is unknown; tag it slot=key1 or slot=key2 to say which key it is"
        )
    slot = other_slot(latest.tags["slot"]) if latest is not None else "key1"
    key = check_key_format(await new_key(slot))
    if verify is not None:
        await verify(key)
    carried = {k: v for k, v in (latest.tags if latest else {}).items() if k in ("region", "resource")}
    stored = await store.set(
        secret,
        key,
        tags={
            **carried,
            **(tags or {}),
            "slot": slot,
            "rotated-at": str(int(time.time())),
            "rotated-by": rotated_by,
            "announced": "false",
        },
    )
    await announce()
    await store.update(secret, stored.version, tags={**stored.tags, "announced": "true"})
    return SpeechRotation(slot, stored.version, False)


async def verify_with_sts(key: str, sts_base: str, http: httpx.AsyncClient) -> None:
    """Ask the region's token service for a token with `key`: Azure's own check that it works."""
    url = sts_token_url(sts_base)
    try:
        response = await http.post(url, headers={"Ocp-Apim-Subscription-Key": key}, timeout=10.0)
    except httpx.HTTPError as exc:
        raise SpeechKeyError(f"could not reach {url} to verify the key ({type(exc).__name__})") from None
    if response.status_code != 200:
        raise SpeechKeyError(
            f"Azure refused the new key ({response.status_code} from {url}); nothing was stored"
        )


def sts_token_url(sts_base: str) -> str:
    """Where a region's (or a custom domain's) token service exchanges a key for a token."""
    return sts_base.rstrip("/") + "/sts/v1.0/issueToken"


def sts_base_for(region: str | None, override: str | None) -> str:
    if override:
        return override
    if not region:
        raise SpeechKeyError("--verify needs the region: set SPEECH_REGION or SPEECHGATE_STS_ENDPOINT")
    return f"https://{region}.api.cognitive.microsoft.com"
