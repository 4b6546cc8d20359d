"""Opening the resources named by the settings: the secret store and the Redis client."""

from __future__ import annotations

from token_service.filestore import FileStore
from token_service.redisconn import Redis, connect
from token_service.settings import Settings, SettingsError
from token_service.store import SecretStore


def open_store(settings: Settings) -> SecretStore:
    """Key Vault when SPEECHGATE_KEY_VAULT_URL is set, else the local file store."""
    if settings.key_vault_url:
        from token_service.keyvault import KeyVaultStore  # the Azure SDK loads only when used

        return KeyVaultStore(settings.key_vault_url)
    return FileStore(settings.store_dir)


def open_redis(settings: Settings) -> Redis | None:
    if not settings.redis_url:
        return None
    try:
        return connect(settings.redis_url)
    except ValueError as exc:
        raise SettingsError(f"SPEECHGATE_REDIS_URL / REDIS_URL: {exc}") from None
