"""Configuration: one frozen Settings object, read from the environment once at start-up.

Every name is documented in the README's configuration table; defaults are the embedded ones that
`speechgate dev` runs on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    # Where the services listen.
    host: str = "127.0.0.1"
    port: int = 8000
    relay_host: str = "127.0.0.1"
    relay_port: int = 8001
    # Who we are, as written into and checked in every token.
    issuer: str = "http://127.0.0.1:8000"
    audience: str = "speechgate-relay"
    relay_url: str = "ws://127.0.0.1:8001"
    # Shared state. No Redis URL means per-process, in-memory limits (dev only).
    redis_url: str | None = None
    redis_prefix: str = "sg:"
    # The secret store: a Key Vault when its URL is set, else the local file store.
    store_dir: Path = Path(".speechgate")
    key_vault_url: str | None = None
    # Token endpoint behaviour.
    max_body_bytes: int = 16 * 1024
    http_timeout_s: float = 10.0  # for a request's headers, and again for its body (408 after)
    max_connections: int = 2048  # per token-service process; 503 beyond
    max_connections_per_address: int = 256  # of those, from one address (trusted proxies aside); 0: off
    client_cache_s: float = 30.0
    key_refresh_s: float = 60.0
    idp_jwks_min_refresh_s: float = 10.0
    idp_jwks_max_age_s: float = 3600.0
    idp_jwks_timeout_s: float = 5.0  # for one JWKS fetch as a whole (an IdP may trickle its bytes)
    idp_leeway_s: int = 30
    # Proxies whose X-Forwarded-For we believe (uvicorn's --forwarded-allow-ips).
    forwarded_allow_ips: str = ""  # proxies whose X-Forwarded-For is believed; none by default
    log_level: str = "info"
    log_format: str = "auto"  # json | text | auto: JSON unless stderr is a terminal
    # The relay: where Azure Speech is, and how it authenticates there.
    speech_region: str | None = None
    speech_endpoint: str | None = None  # a custom domain, sovereign cloud or local fake
    speech_key: str | None = None  # development only; production keeps it in the store
    upstream_auth: str = "key"  # key | sts | entra
    speech_resource_id: str | None = None  # for Entra ID: the Speech resource's ARM id
    jwks_url: str | None = None  # the token service's JWKS; default: issuer + /.well-known/jwks.json
    max_frame_bytes: int = 64 * 1024
    lease_s: float = 15.0
    heartbeat_s: float = 2.0
    drain_s: float = 30.0
    upstream_connect_attempts: int = 3
    upstream_backoff_s: float = 30.0  # an upstream of the pool that refused gets no streams this long
    keepalive_s: float = 20.0  # ping a quiet app after this; give up after as long again
    upstream_ping_s: float = 3.0  # ping a quiet Azure after this; marked down after as long again
    # The Azure door forwards frames as bytes (speechgate/relay/splice.py); off: through websockets' messages.
    splice: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            name = ENV_NAMES[f.name]
            raw = env.get(name)
            if f.name == "redis_url" and raw is None:
                raw = env.get("REDIS_URL")  # the common convention, also what CI sets
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(name, raw, f.default)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("port", "relay_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise SettingsError(f"{ENV_NAMES[name]} must be a port number (0-65535)")
        if self.max_body_bytes < 1024:
            raise SettingsError("SPEECHGATE_MAX_BODY_BYTES must be at least 1024")
        if not 0 < self.http_timeout_s <= 300:
            raise SettingsError("SPEECHGATE_HTTP_TIMEOUT_S must be more than 0 and at most 300 (e.g. 10)")
        if self.max_connections < 1:
            raise SettingsError("SPEECHGATE_MAX_CONNECTIONS must be at least 1 (e.g. 2048)")
        if not 0 < self.idp_jwks_timeout_s <= 60:
            raise SettingsError("SPEECHGATE_IDP_JWKS_TIMEOUT_S must be more than 0 and at most 60 (e.g. 5)")
        if not 0.1 <= self.upstream_ping_s <= 60:
            raise SettingsError("SPEECHGATE_UPSTREAM_PING_S must be 0.1 to 60 (e.g. 3)")
        if self.max_connections_per_address < 0:
            raise SettingsError(
                "SPEECHGATE_MAX_CONNECTIONS_PER_ADDRESS must be 0 (no bound) or more (e.g. 256)"
            )
        if self.key_vault_url is not None and not self.key_vault_url.startswith("https://"):
            raise SettingsError("SPEECHGATE_KEY_VAULT_URL must be an https:// URL")
        if not self.issuer.startswith(("https://", "http://")):
            raise SettingsError("SPEECHGATE_ISSUER must be an http(s) URL")
        if self.log_format not in ("auto", "json", "text"):
            raise SettingsError("SPEECHGATE_LOG_FORMAT must be auto, json or text")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError("SPEECHGATE_LOG_LEVEL must be debug, info, warning or error")
        if self.upstream_auth not in ("key", "sts", "entra"):
            raise SettingsError("SPEECHGATE_UPSTREAM_AUTH must be key, sts or entra")
        if self.upstream_auth == "entra" and not self.speech_resource_id:
            raise SettingsError("SPEECHGATE_UPSTREAM_AUTH=entra needs SPEECHGATE_SPEECH_RESOURCE_ID")
        if self.speech_endpoint and not self.speech_endpoint.startswith(("wss://", "ws://")):
            raise SettingsError("SPEECHGATE_SPEECH_ENDPOINT must be a ws:// or wss:// URL")

    @property
    def token_jwks_url(self) -> str:
        return self.jwks_url or self.issuer.rstrip("/") + "/.well-known/jwks.json"


ENV_NAMES: dict[str, str] = {
    "host": "SPEECHGATE_HOST",
    "port": "SPEECHGATE_PORT",
    "relay_host": "SPEECHGATE_RELAY_HOST",
    "relay_port": "SPEECHGATE_RELAY_PORT",
    "issuer": "SPEECHGATE_ISSUER",
    "audience": "SPEECHGATE_AUDIENCE",
    "relay_url": "SPEECHGATE_RELAY_URL",
    "redis_url": "SPEECHGATE_REDIS_URL",
    "redis_prefix": "SPEECHGATE_REDIS_PREFIX",
    "store_dir": "SPEECHGATE_STORE_DIR",
    "key_vault_url": "SPEECHGATE_KEY_VAULT_URL",
    "max_body_bytes": "SPEECHGATE_MAX_BODY_BYTES",
    "http_timeout_s": "SPEECHGATE_HTTP_TIMEOUT_S",
    "max_connections": "SPEECHGATE_MAX_CONNECTIONS",
    "max_connections_per_address": "SPEECHGATE_MAX_CONNECTIONS_PER_ADDRESS",
    "client_cache_s": "SPEECHGATE_CLIENT_CACHE_S",
    "key_refresh_s": "SPEECHGATE_KEY_REFRESH_S",
    "idp_jwks_min_refresh_s": "SPEECHGATE_IDP_JWKS_MIN_REFRESH_S",
    "idp_jwks_max_age_s": "SPEECHGATE_IDP_JWKS_MAX_AGE_S",
    "idp_jwks_timeout_s": "SPEECHGATE_IDP_JWKS_TIMEOUT_S",
    "idp_leeway_s": "SPEECHGATE_IDP_LEEWAY_S",
    "forwarded_allow_ips": "SPEECHGATE_FORWARDED_ALLOW_IPS",
    "log_level": "SPEECHGATE_LOG_LEVEL",
    "log_format": "SPEECHGATE_LOG_FORMAT",
    "speech_region": "SPEECH_REGION",
    "speech_endpoint": "SPEECHGATE_SPEECH_ENDPOINT",
    "speech_key": "SPEECH_KEY",
    "upstream_auth": "SPEECHGATE_UPSTREAM_AUTH",
    "speech_resource_id": "SPEECHGATE_SPEECH_RESOURCE_ID",
    "jwks_url": "SPEECHGATE_JWKS_URL",
    "max_frame_bytes": "SPEECHGATE_MAX_FRAME_BYTES",
    "lease_s": "SPEECHGATE_LEASE_S",
    "heartbeat_s": "SPEECHGATE_HEARTBEAT_S",
    "drain_s": "SPEECHGATE_DRAIN_S",
    "upstream_connect_attempts": "SPEECHGATE_UPSTREAM_CONNECT_ATTEMPTS",
    "upstream_backoff_s": "SPEECHGATE_UPSTREAM_BACKOFF_S",
    "splice": "SPEECHGATE_SPLICE",
    "keepalive_s": "SPEECHGATE_KEEPALIVE_S",
    "upstream_ping_s": "SPEECHGATE_UPSTREAM_PING_S",
}


def _convert(name: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
    except ValueError:
        kind = {"int": "a whole number", "float": "a number"}.get(
            type(default).__name__, type(default).__name__
        )
        raise SettingsError(f"{name}={raw[:40]!r} is not {kind} (e.g. {name}={default})") from None
    return raw


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def url_host(host: str) -> str:
    """A listen address as it goes into a URL (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def with_addresses(
    settings: Settings,
    environ: Mapping[str, str],
    token: tuple[str, int] | None = None,
    relay: tuple[str, int] | None = None,
) -> Settings:
    """The issuer (with the metadata and JWKS URLs that follow from it) and the relay URL from the
    addresses actually bound, where SPEECHGATE_ISSUER / SPEECHGATE_RELAY_URL do not set them:
    a token must never advertise a port nobody of ours listens on. Only a loopback address can
    be derived; a service listening on any other needs the URL apps reach it at (a proxy's)."""
    changes: dict[str, Any] = {}
    for name, address, scheme in (("issuer", token, "http"), ("relay_url", relay, "ws")):
        if address is None or environ.get(ENV_NAMES[name]):
            continue
        host, port = address
        if host not in LOOPBACK_HOSTS:
            example = "https://speech-auth.example.com" if name == "issuer" else "wss://speech.example.com"
            raise SettingsError(
                f"{ENV_NAMES[name]} is not set and cannot be derived from {host}: set it to the URL "
                f"apps reach this service at (e.g. {example})"
            )
        changes[name] = f"{scheme}://{url_host(host)}:{port}"
    return replace(settings, **changes) if changes else settings
