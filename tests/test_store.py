"""The secret store: versions, tags, enable/disable; the file store's permissions and atomicity."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from speechgate.core.filestore import FileStore
from speechgate.core.store import MemoryStore, SecretDisabled, SecretNotFound, SecretStore, StoreError
from tests.support.vault import Vault

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(params=["memory", "file", "keyvault"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SecretStore]:
    """Each store behaves the same: the Key Vault one through the real SDK against the fake."""
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "file":
        yield FileStore(tmp_path / "store")
    else:
        vault: Vault = request.getfixturevalue("vault")
        kv = vault.store()
        yield kv
        await kv.close()


async def test_newest_version_is_returned_and_old_ones_stay_readable(store: SecretStore) -> None:
    first = await store.set("speech-key", "one", tags={"slot": "key1"})
    second = await store.set("speech-key", "two", tags={"slot": "key2"}, content_type="text/plain")
    assert first.version != second.version
    assert len(second.version) == 32
    latest = await store.get("speech-key")
    assert (latest.value, latest.tags["slot"], latest.content_type) == ("two", "key2", "text/plain")
    assert (await store.get("speech-key", first.version)).value == "one"
    listed = await store.versions("speech-key")
    assert [v.version for v in listed] == [first.version, second.version]
    assert all(v.value is None for v in listed)  # listings never carry values


async def test_disabled_version_cannot_be_read_but_is_listed(store: SecretStore) -> None:
    item = await store.set("k", "v")
    changed = await store.update("k", item.version, enabled=False, tags={"state": "retired"})
    assert changed.enabled is False
    assert changed.value is None
    with pytest.raises(SecretDisabled):
        await store.get("k")
    (listed,) = await store.versions("k")
    assert (listed.enabled, listed.tags) == (False, {"state": "retired"})
    await store.update("k", item.version, enabled=True)
    assert (await store.get("k")).value == "v"


async def test_missing_secret_and_version_are_not_found(store: SecretStore) -> None:
    with pytest.raises(SecretNotFound):
        await store.get("nothing")
    with pytest.raises(SecretNotFound):
        await store.versions("nothing")
    await store.set("k", "v")
    with pytest.raises(SecretNotFound):
        await store.get("k", "0" * 32)
    with pytest.raises(SecretNotFound):
        await store.update("k", "0" * 32, enabled=False)


async def test_names_are_listed_sorted(store: SecretStore) -> None:
    for name in ("b-secret", "a-secret"):
        await store.set(name, "x")
    assert await store.names() == ["a-secret", "b-secret"]


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "x" * 128, "spaces here"])
def test_file_store_refuses_names_that_key_vault_would(tmp_path: Path, name: str) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(StoreError, match="invalid secret name"):
        run(store.set(name, "x"))


def test_file_store_is_private_to_its_owner(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    run(store.set("k", "secret-value"))
    assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == 0o700
    files = list((tmp_path / "store" / "secrets").iterdir())
    assert [f.name for f in files] == ["k.json"]  # no temporary file left behind
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600


def test_file_store_damage_is_a_clear_error_that_names_the_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    run(store.set("k", "v"))
    (tmp_path / "secrets" / "k.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"k\.json is damaged"):
        run(store.get("k"))


WRITER = """
import asyncio, sys
from speechgate.core.filestore import FileStore
async def main():
    store = FileStore(sys.argv[1])
    for n in range(25):
        await store.set("shared", f"{sys.argv[2]}-{n}")
asyncio.run(main())
"""


def test_concurrent_writers_in_two_processes_lose_no_version(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), tag]) for tag in ("a", "b")]
    assert [p.wait(60) for p in procs] == [0, 0]
    store = FileStore(tmp_path)
    versions = run(store.versions("shared"))
    values = {run(store.get("shared", v.version)).value for v in versions}
    assert len(versions) == 50
    assert values == {f"{tag}-{n}" for tag in "ab" for n in range(25)}
    json.loads((tmp_path / "secrets" / "shared.json").read_text())  # still one valid document
