"""`speechgate dev`: the embedded defaults — a local file store with a signing key and a
development client, so the whole path runs on a laptop with one command."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from relay import offline_synthesis
from token_service.clients import (
    ClientPolicy,
    check_secret,
    ensure_hash_key,
    hash_secret,
    new_client_secret,
    save_client,
    secret_name,
)
from token_service.keys import ensure_signing_key
from token_service.settings import Settings
from token_service.store import SecretNotFound, SecretStore

DEV_CLIENT_ID = "dev-client"
SDK_PATH = "/speech/recognition/conversation/cognitiveservices/v1"


@dataclass(frozen=True)
class DevClient:
    client_id: str
    client_secret: str


def _saved_path(store_dir: Path) -> Path:
    return store_dir / "dev-client.json"


def saved_client(store_dir: Path) -> DevClient | None:
    """The dev client `speechgate dev` made in this store, for the tools that act as an app."""
    path = _saved_path(store_dir)
    if not path.exists():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return DevClient(saved["client_id"], saved["client_secret"])


async def bootstrap(store: SecretStore, store_dir: Path, environ: dict[str, str] | None = None) -> DevClient:
    """Make sure the store has a signing key and a development client; return its credentials.

    The dev client's secret is kept in `<store>/dev-client.json` (0600) so that a restart prints
    the same credentials; `SPEECHGATE_DEV_CLIENT_ID`/`_SECRET` fix them instead.
    """
    env = os.environ if environ is None else environ
    await ensure_signing_key(store)
    hash_key = await ensure_hash_key(store)
    saved_path = _saved_path(store_dir)
    saved: dict[str, str] = {}
    if saved_path.exists():
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    client_id = env.get("SPEECHGATE_DEV_CLIENT_ID") or saved.get("client_id") or DEV_CLIENT_ID
    secret = (
        env.get("SPEECHGATE_DEV_CLIENT_SECRET")
        or (saved.get("client_secret") if saved.get("client_id") == client_id else None)
        or new_client_secret()
    )

    try:
        current = ClientPolicy.from_json((await store.get(secret_name(client_id))).value or "")
    except SecretNotFound:
        current = None
    if current is None or not check_secret(hash_key, current, secret):
        policy = ClientPolicy(
            client_id=client_id,
            name="development client created by speechgate dev",
            secret_hash=hash_secret(hash_key, client_id, secret),
        )
        await save_client(store, policy)
    if saved != {"client_id": client_id, "client_secret": secret}:
        fd = os.open(saved_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"client_id": client_id, "client_secret": secret}, handle)
    return DevClient(client_id, secret)


def banner(client: DevClient, token_url: str, relay_url: str, settings: Settings) -> str:
    limits = (
        f"Redis at {settings.redis_url}" if settings.redis_url else "in-memory (set REDIS_URL to share them)"
    )
    if settings.speech_endpoint or settings.speech_region:
        upstream = settings.speech_endpoint or f"Azure Speech in {settings.speech_region}"
    else:
        speaker = (
            "espeak-ng, PCM output formats" if offline_synthesis.ESPEAK else "none: install espeak-ng for it"
        )
        upstream = (
            "OFFLINE recognizer (PocketSphinx): English only, low accuracy;\n"
            f"                  synthesis: {speaker};\n"
            "                  set SPEECH_KEY and SPEECH_REGION for Azure Speech"
        )
    demo = relay_url.replace("ws://", "http://", 1) + "/demo"
    credentials = f"{client.client_id}:{client.client_secret}"
    return f"""
speechgate dev — development mode, not for production
  token service   {token_url}
  relay           {relay_url}
                  Speech SDK endpoint: {relay_url}{SDK_PATH}
  upstream        {upstream}
  rate limits     {limits}
  dev client      client_id={client.client_id}
                  client_secret={client.client_secret}

Try it:
  1. get a token:
     curl -s -u '{credentials}' -d grant_type=client_credentials {token_url}/v1/token
  2. transcribe a WAV file (16 kHz mono is best; others are converted):
     uv run speechgate stream some.wav
  3. talk to it: open {demo} in a browser
"""
