"""The local file store: the embedded default, used by `speechgate dev` and the CLI without a vault.

Layout: `<dir>/secrets/<name>.json`, one file per secret holding all its versions. Every file is
created 0600 inside a 0700 directory, written to a temporary file and renamed over the old one
(readers never see half a file), and changes hold an exclusive lock so that the CLI and a running
service can write at the same time without losing a version.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path

from speechgate.core.store import SecretNotFound, SecretVersion, StoreError, VersionTable

# Key Vault's own rule for secret names; it also keeps names from escaping the directory.
_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise StoreError(f"invalid secret name {name!r}: use 1-127 letters, digits and '-'")


class FileStore:
    """A SecretStore kept in a directory on local disk."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._secrets = self.directory / "secrets"
        self._secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        os.chmod(self._secrets, 0o700)

    async def get(self, name: str, version: str | None = None) -> SecretVersion:
        return self._load(name).get(name, version)

    async def set(
        self,
        name: str,
        value: str,
        *,
        tags: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> SecretVersion:
        with self._locked():
            table = self._load(name, missing_ok=True)
            entry = table.add(name, value, tags, content_type)
            self._save(name, table)
        return entry

    async def versions(self, name: str) -> list[SecretVersion]:
        return self._load(name).versions(name)

    async def update(
        self,
        name: str,
        version: str,
        *,
        enabled: bool | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> SecretVersion:
        with self._locked():
            table = self._load(name)
            changed = table.update(name, version, enabled, tags)
            self._save(name, table)
        return changed

    async def names(self) -> list[str]:
        return sorted(p.stem for p in self._secrets.glob("*.json"))

    async def close(self) -> None:
        return None

    def _path(self, name: str) -> Path:
        check_name(name)
        return self._secrets / f"{name}.json"

    def _load(self, name: str, missing_ok: bool = False) -> VersionTable:
        path = self._path(name)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if missing_ok:
                return VersionTable()
            raise SecretNotFound(f"secret {name!r} not found") from None
        try:
            items = [SecretVersion(**item) for item in json.loads(raw)["versions"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"secret file {path.name} is damaged: {type(exc).__name__}") from None
        return VersionTable({name: items})

    def _save(self, name: str, table: VersionTable) -> None:
        path = self._path(name)
        body = json.dumps({"versions": [asdict(v) for v in table.data[name]]}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self._secrets, prefix=".tmp-", suffix=".json")
        try:
            # mkstemp creates the file 0600 already; fsync so a crash leaves old or new, never empty.
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
