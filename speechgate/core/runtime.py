"""Opening the resources named by the settings: the secret store and the Redis client."""

from __future__ import annotations

from speechgate.core.filestore import FileStore
from speechgate.core.redisconn import Redis, connect
from speechgate.core.settings import Settings, SettingsError
from speechgate.core.store import SecretStore


def open_store(settings: Settings) -> SecretStore:
    """Key Vault when SPEECHGATE_KEY_VAULT_URL is set, else the local file store."""
    if settings.key_vault_url:
        from speechgate.core.keyvault import KeyVaultStore  # the Azure SDK loads only when used

        return KeyVaultStore(settings.key_vault_url)
    return FileStore(settings.store_dir)


# Each process's connections carry its role (CLIENT SETNAME): `CLIENT LIST` tells them apart.
RELAY = "speechgate-relay"
TOKEN_SERVICE = "speechgate-token-service"  # noqa: S105 - a name, not a secret
CLI = "speechgate-cli"


def open_redis(settings: Settings, name: str = CLI) -> Redis | None:
    if not settings.redis_url:
        return None
    try:
        return connect(settings.redis_url, name)
    except ValueError as exc:
        raise SettingsError(f"SPEECHGATE_REDIS_URL / REDIS_URL: {exc}") from None
