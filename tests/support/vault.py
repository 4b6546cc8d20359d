"""Fixtures for Key Vault tests: the fake vault over HTTPS and its identity endpoint, and the
environment that makes DefaultAzureCredential take its managed-identity path to them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from speechgate.core.keyvault import KeyVaultStore
from tests.fakes.keyvault import FakeKeyVault
from tests.support.servers import ServerThread

# Variables that would make another credential in DefaultAzureCredential's chain win.
_OTHER_CREDENTIALS = (
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_TENANT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_USERNAME",
    "AZURE_PASSWORD",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "AZURE_AUTHORITY_HOST",
)


@dataclass
class Vault:
    fake: FakeKeyVault
    url: str
    ca_path: Path
    env: dict[str, str]  # for child processes
    tls: dict[str, str]  # uvicorn options that serve HTTPS with the same test CA
    server: ServerThread

    def store(self, **options: Any) -> KeyVaultStore:
        """A KeyVaultStore on DefaultAzureCredential; create it inside the loop that uses it."""
        options.setdefault("retry_total", 0)
        return KeyVaultStore(
            self.url, verify_challenge_resource=False, connection_verify=str(self.ca_path), **options
        )


@pytest.fixture
def vault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Vault]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_path, key_path, cert_path = tmp_path / "ca.pem", tmp_path / "key.pem", tmp_path / "cert.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    fake = FakeKeyVault()
    with (
        ServerThread(fake.app(), ssl_keyfile=str(key_path), ssl_certfile=str(cert_path)) as kv,
        ServerThread(fake.identity_app()) as identity,
    ):
        env = {
            "IDENTITY_ENDPOINT": f"{identity.url}/msi/token",
            "IDENTITY_HEADER": fake.identity_header,
            "AZURE_TOKEN_CREDENTIALS": "ManagedIdentityCredential",
        }
        for name in _OTHER_CREDENTIALS:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        tls = {"ssl_keyfile": str(key_path), "ssl_certfile": str(cert_path)}
        yield Vault(fake, f"https://127.0.0.1:{kv.port}", ca_path, env, tls, kv)
