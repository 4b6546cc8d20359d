"""The security team's CLI against the fake Key Vault (through the real SDK) and the file store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from speechgate.cli import main
from speechgate.cli.common import Deps
from speechgate.core.filestore import FileStore
from speechgate.core.keyspace import Keyspace
from speechgate.core.settings import Settings
from speechgate.core.store import StoreError
from tests.support.cli import Cli, audit_lines
from tests.support.processes import RedisServer, wait_until
from tests.support.servers import ServerThread
from tests.support.services import TokenService
from tests.support.vault import Vault

SPEECH_KEY_1 = "a" * 32
SPEECH_KEY_2 = "b" * 32


@pytest.fixture(params=["file", "keyvault"])
def cli(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, prefix: str) -> Cli:
    settings = Settings(store_dir=tmp_path / "store", redis_url=redis_url, redis_prefix=prefix)
    if request.param == "file":
        return Cli(Deps(settings=settings), settings)
    vault: Vault = request.getfixturevalue("vault")
    return Cli(Deps(settings=settings, open_store=lambda _: vault.store()), settings)


def test_clients_add_list_show_disable_enable(cli: Cli) -> None:
    added = cli(
        "clients",
        "add",
        "shop-backend",
        "--name",
        "Shop",
        "--scope",
        "speech:recognize",
        "--language",
        "en-US",
        "--rate-subject",
        "5/minute",
    )
    assert "client_secret: " in added.stdout
    secret = added.stdout.split("client_secret: ")[1].split()[0]
    (line,) = audit_lines(added)
    assert line["audit"] == "clients.add"
    assert line["client_id"] == "shop-backend"
    assert secret not in added.stderr  # the audit line never carries it

    shown = cli.json("clients", "show", "shop-backend")
    assert shown["scopes"] == ["speech:recognize"]
    assert shown["rate_limits"]["subject"] == "5/minute"
    assert "secret_hash" not in shown
    assert [c["client_id"] for c in cli.json("clients", "list")] == ["shop-backend"]

    cli("clients", "disable", "shop-backend", code=4)  # no terminal, no --yes: refused
    cli("clients", "disable", "shop-backend", "--yes")
    assert cli.json("clients", "show", "shop-backend")["enabled"] is False
    cli("clients", "enable", "shop-backend")
    assert cli.json("clients", "show", "shop-backend")["enabled"] is True
    cli("clients", "add", "shop-backend", code=1)  # exists already


def test_public_client_needs_its_identity_provider(cli: Cli) -> None:
    result = cli("clients", "add", "mobile", "--public", code=2)
    assert "identity provider" in result.output
    cli(
        "clients",
        "add",
        "mobile",
        "--public",
        "--idp-issuer",
        "https://login.example",
        "--idp-jwks-uri",
        "https://login.example/keys",
        "--idp-audience",
        "mobile-app",
    )
    assert cli.json("clients", "show", "mobile")["type"] == "public"


def test_unknown_client_exits_3_with_a_message(cli: Cli) -> None:
    result = cli("clients", "show", "nobody", code=3)
    assert "no client 'nobody'" in result.output


def test_signing_rotation_keeps_the_previous_key_until_its_grace_ends(cli: Cli) -> None:
    first = cli.json("keys", "rotate-signing")
    assert first["created"] is True
    assert first["previous_kids"] == []
    second = cli.json("keys", "rotate-signing", "--grace", "0", "--publish-delay", "0")
    assert second["previous_kids"] == [first["signer_kid"]]
    listed = cli.json("keys", "list")["speechgate-signing-key"]
    assert [(v["kid"], v["state"], v["enabled"]) for v in listed] == [
        (first["signer_kid"], "previous", True),
        (second["signer_kid"], "active", True),
    ]
    pruned = cli.json("keys", "prune", "--yes")
    assert pruned["retired_kids"] == [first["signer_kid"]]
    listed = cli.json("keys", "list")["speechgate-signing-key"]
    assert [(v["state"], v["enabled"]) for v in listed] == [("retired", False), ("active", True)]
    assert cli.json("keys", "prune", "--yes")["retired_kids"] == []  # nothing due twice


def test_an_interrupted_signing_rotation_is_finished_not_repeated(cli: Cli) -> None:
    cli("keys", "rotate-signing")

    async def half_rotation() -> None:  # step 1 done, step 2 (retagging) never ran
        from speechgate.core.keys import add_signing_key

        store = cli.deps.open_store(cli.settings)
        await add_signing_key(store)
        await store.close()

    asyncio.run(half_rotation())
    before = len(cli.json("keys", "list")["speechgate-signing-key"])
    finished = cli.json("keys", "rotate-signing")
    assert finished["created"] is False
    assert len(finished["previous_kids"]) == 1
    listed = cli.json("keys", "list")["speechgate-signing-key"]
    assert len(listed) == before  # no extra key
    assert [v["state"] for v in listed].count("active") == 1  # one signer


def test_revoking_a_leaked_signing_key_disables_it_now_and_refuses_its_kid_for_good(
    cli: Cli, sync_redis: redis.Redis
) -> None:
    keyspace = Keyspace(cli.settings.redis_prefix)
    old = cli.json("keys", "rotate-signing")["signer_kid"]
    signer = cli.json("keys", "rotate-signing", "--publish-delay", "0")["signer_kid"]  # `old`: in its grace
    pubsub = sync_redis.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(keyspace.events)
    assert pubsub.get_message(timeout=5) is not None

    cli("keys", "revoke-signing", "--kid", old, code=4)  # no terminal, no --yes: refused
    result = cli("keys", "revoke-signing", "--kid", old, "--yes")
    assert f"revoked signing key {old}" in result.stdout
    (line,) = audit_lines(result)
    assert (line["audit"], line["kid"], line["new_signer_kid"]) == ("keys.revoke-signing", old, None)
    states = {
        v["kid"]: (v["state"], v["enabled"]) for v in cli.json("keys", "list")["speechgate-signing-key"]
    }
    assert states == {old: ("revoked", False), signer: ("active", True)}  # its grace had not run out
    assert sync_redis.smembers(keyspace.revoked_signing_keys) == {old}
    assert sync_redis.ttl(keyspace.revoked_signing_keys) == -1  # kept for good
    events = [
        json.loads(m["data"]) for m in (pubsub.get_message(timeout=5), pubsub.get_message(timeout=5)) if m
    ]
    assert events == [{"type": "revoke", "kid": old}, {"type": "reload", "what": "signing-key"}]
    pubsub.close()

    revoked = cli.json(
        "keys", "revoke-signing", "--kid", signer, "--yes"
    )  # the signer: a new key signs first
    assert revoked["was_enabled"] is True
    assert revoked["new_signer_kid"] not in (None, signer, old)
    listed = cli.json("keys", "list")["speechgate-signing-key"]
    assert listed[-1]["kid"] == revoked["new_signer_kid"]  # the newest: it signs
    assert {v["kid"]: (v["state"], v["enabled"]) for v in listed} == {
        old: ("revoked", False),
        signer: ("revoked", False),
        revoked["new_signer_kid"]: ("active", True),
    }
    again = cli.json("keys", "revoke-signing", "--kid", signer, "--yes")  # a repeat changes nothing
    assert (again["was_enabled"], again["new_signer_kid"]) == (False, None)
    assert len(cli.json("keys", "list")["speechgate-signing-key"]) == 3
    assert {old, signer} <= sync_redis.smembers(keyspace.revoked_signing_keys)

    upcoming = cli.json("keys", "rotate-signing", "--publish-delay", "600")["signer_kid"]
    not_yet = cli.json("keys", "revoke-signing", "--kid", upcoming, "--yes")  # published, not signing
    assert not_yet["new_signer_kid"] is None
    listed = cli.json("keys", "list")["speechgate-signing-key"]
    assert [v["kid"] for v in listed if v["signing"]] == [revoked["new_signer_kid"]]
    # The signer revoked while a rotation's key waits its turn: that key signs at once, no other.
    scheduled = cli.json("keys", "rotate-signing", "--publish-delay", "600")["signer_kid"]
    before = len(cli.json("keys", "list")["speechgate-signing-key"])
    brought_forward = cli.json("keys", "revoke-signing", "--kid", revoked["new_signer_kid"], "--yes")
    assert brought_forward["new_signer_kid"] == scheduled
    listed = cli.json("keys", "list")["speechgate-signing-key"]
    assert len(listed) == before
    assert [v["kid"] for v in listed if v["signing"]] == [scheduled]

    unknown = cli("keys", "revoke-signing", "--kid", "-no-such-kid", "--yes", code=3)
    assert "speechgate keys list" in unknown.output


def test_revoking_a_signing_key_without_redis_changes_nothing(tmp_path: Path) -> None:
    settings = Settings(store_dir=tmp_path / "store", redis_url=None)
    cli = Cli(Deps(settings=settings), settings)
    kid = cli.json("keys", "rotate-signing")["signer_kid"]
    result = cli("keys", "revoke-signing", "--kid", kid, "--yes", code=1)
    assert "needs Redis" in result.output
    assert [v["enabled"] for v in cli.json("keys", "list")["speechgate-signing-key"]] == [True]


class FakeSts:
    """The region's token endpoint: a token for a known key, 401 otherwise."""

    def __init__(self, valid: set[str]) -> None:
        self.valid = valid

    def app(self) -> Starlette:
        async def issue(request: Request) -> Response:
            if request.headers.get("ocp-apim-subscription-key") in self.valid:
                return PlainTextResponse("eyJ.sts.token")
            return JSONResponse({"error": {"code": "401", "message": "Access denied"}}, status_code=401)

        return Starlette(routes=[Route("/sts/v1.0/issueToken", issue, methods=["POST"])])


def test_speech_key_rotation_alternates_slots_and_verifies_with_sts(cli: Cli) -> None:
    sts = FakeSts({SPEECH_KEY_1, SPEECH_KEY_2})
    with ServerThread(sts.app()) as server:
        verify = ["--verify", "--sts-endpoint", server.url, "--region", "westeurope"]
        first = cli.json("keys", "rotate-speech", "--from-stdin", "--yes", *verify, input=SPEECH_KEY_1 + "\n")
        second = cli.json(
            "keys", "rotate-speech", "--from-stdin", "--yes", *verify, input=SPEECH_KEY_2 + "\n"
        )
        refused = cli(
            "keys", "rotate-speech", "--from-stdin", "--yes", *verify, input="c" * 32 + "\n", code=1
        )
    assert (first["slot"], second["slot"]) == ("key1", "key2")
    assert "Azure refused the new key (401" in refused.output
    listed = cli.json("keys", "list")["speechgate-speech-key"]
    assert [v["slot"] for v in listed] == ["key1", "key2"]  # the refused key was not stored
    assert all("value" not in v for v in listed)
    assert SPEECH_KEY_2 not in json.dumps(listed)


def test_speech_key_rotation_refuses_what_is_not_a_key(cli: Cli) -> None:
    result = cli("keys", "rotate-speech", "--from-stdin", "--yes", input="not a key\n", code=1)
    assert "does not look like an Azure Speech key" in result.output
    cli("keys", "rotate-speech", "--yes", code=2)  # neither --from-stdin nor --azure-resource


def test_an_interrupted_speech_rotation_is_announced_not_regenerated(
    cli: Cli, sync_redis: redis.Redis
) -> None:
    cli("keys", "rotate-speech", "--from-stdin", "--yes", input=SPEECH_KEY_1 + "\n")

    async def stored_but_not_announced() -> None:
        from speechgate.core.speechkeys import SPEECH_KEY_SECRET

        store = cli.deps.open_store(cli.settings)
        await store.set(SPEECH_KEY_SECRET, SPEECH_KEY_2, tags={"slot": "key2", "announced": "false"})
        await store.close()

    asyncio.run(stored_but_not_announced())
    pubsub = sync_redis.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(Keyspace(cli.settings.redis_prefix).events)
    assert pubsub.get_message(timeout=5) is not None
    result = cli.json("keys", "rotate-speech", "--from-stdin", "--yes", input="")  # no key needed
    assert result["finished_previous"] is True
    assert result["slot"] == "key2"
    message = pubsub.get_message(timeout=5)
    assert message is not None
    assert json.loads(message["data"]) == {"type": "reload", "what": "speech-key"}
    pubsub.close()


def test_tokens_revoke_writes_deny_entries_with_the_right_lifetime(cli: Cli, sync_redis: redis.Redis) -> None:
    cli("clients", "add", "shop", "--token-ttl", "300", "--max-session", "900")
    keyspace = Keyspace(cli.settings.redis_prefix)
    cli("tokens", "revoke", "--client", "shop", "--subject", "alice", "--yes")
    assert 1100 <= sync_redis.ttl(keyspace.revoked_subject("shop", "alice")) <= 1200
    said = cli("tokens", "revoke", "--client", "shop", "--yes").stdout
    assert sync_redis.get(keyspace.revoked_client("shop")) is not None
    # Not a lockout: it once said only "denied for 1200 s", while new tokens work at once.
    assert "every token issued until now" in said
    assert "tokens issued from now on work" in said
    revoked = cli.json("tokens", "revoke", "--jti", "abc123", "--yes")
    assert revoked["ttl_s"] == 1200  # the longest lifetime + session of any client
    assert sync_redis.exists(keyspace.revoked_jti("abc123"))
    cli("tokens", "revoke", "--subject", "alice", "--yes", code=2)
    cli("tokens", "revoke", "--client", "shop", code=4)


def test_vault_failures_exit_1_and_say_what_to_check(vault: Vault, tmp_path: Path) -> None:
    settings = Settings(store_dir=tmp_path, redis_url=None)
    cli = Cli(Deps(settings=settings, open_store=lambda _: vault.store()), settings)
    cli("clients", "add", "shop")
    for status, words in (
        (503, "answered 503"),
        (403, "Key Vault Secrets"),
        (429, "throttling"),
        (401, "refused our credentials"),
    ):
        vault.fake.fail_with = status
        result = cli("clients", "show", "shop", code=1)
        assert words in result.output
    vault.fake.fail_with = None
    assert cli.json("clients", "show", "shop")["client_id"] == "shop"  # nothing lost


def test_a_damaged_policy_is_a_clear_error(cli: Cli) -> None:
    async def damage() -> None:
        store = cli.deps.open_store(cli.settings)
        await store.set("speechgate-client-broken", "{not json")
        await store.close()

    asyncio.run(damage())
    result = cli("clients", "show", "broken", code=1)
    assert "stored policy of client 'broken' is invalid" in result.output


# --- the rotation runbook under load --------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path, start_service: Any, redis_url: str, prefix: str) -> tuple[Cli, TokenService]:
    settings = Settings(store_dir=tmp_path / "store", redis_url=redis_url, redis_prefix=prefix)
    cli = Cli(Deps(settings=settings), settings)
    cli("keys", "rotate-signing")
    service = start_service(store=FileStore(settings.store_dir), key_refresh_s=3600.0)
    return cli, service


def test_rotations_under_load_fail_no_request_and_no_verification(live: tuple[Cli, TokenService]) -> None:
    cli, service = live
    added = cli.json("clients", "add", "loadtest", "--rate-client", "", "--rate-subject", "", "--rate-ip", "")
    client_id, secret = added["client_id"], added["client_secret"]
    stop = threading.Event()
    failures: list[str] = []
    kids: set[str] = set()
    issued = 0

    def load() -> None:
        nonlocal issued
        jwks: dict[str, Any] = {}
        with httpx.Client(base_url=service.url) as http:
            while not stop.is_set():
                response = http.post(
                    "/v1/token", auth=(client_id, secret), data={"grant_type": "client_credentials"}
                )
                if response.status_code != 200:
                    failures.append(f"token: {response.status_code} {response.text}")
                    continue
                token = response.json()["access_token"]
                kid = jwt.get_unverified_header(token)["kid"]
                if kid not in jwks:  # a relay refetches the JWKS on an unknown kid, as here
                    jwks = {k["kid"]: k for k in http.get("/.well-known/jwks.json").json()["keys"]}
                try:
                    jwt.decode(
                        token,
                        jwt.PyJWK(jwks[kid]).key,
                        algorithms=["ES256"],
                        audience=service.settings.audience,
                        issuer=service.settings.issuer,
                    )
                except (KeyError, jwt.InvalidTokenError) as exc:
                    failures.append(f"verify: {exc!r}")
                kids.add(kid)
                issued += 1

    worker = threading.Thread(target=load)
    worker.start()
    try:
        signers = []
        for n in range(3):
            signers.append(cli.json("keys", "rotate-signing", "--publish-delay", "1")["signer_kid"])
            # The reload event reaches the service: it publishes the new key, which signs a second later.
            assert wait_until(lambda: signers[-1] in kids, timeout=10), f"rotation {n} not picked up"
            if n < 2:
                key = (SPEECH_KEY_1 if n == 0 else SPEECH_KEY_2) + "\n"
                cli("keys", "rotate-speech", "--from-stdin", "--yes", input=key)
    finally:
        stop.set()
        worker.join(30)
    assert failures == []
    assert issued > 20
    assert set(signers) <= kids
    assert [v["slot"] for v in cli.json("keys", "list")["speechgate-speech-key"]] == ["key1", "key2"]


def test_a_rotated_key_is_published_at_once_through_the_reload_event_and_signs_after_the_delay(
    live: tuple[Cli, TokenService],
) -> None:
    cli, service = live
    added = cli.json("clients", "add", "shop", "--rate-client", "", "--rate-subject", "", "--rate-ip", "")
    client_id, secret = added["client_id"], added["client_secret"]

    def signed_by() -> str:
        response = service.token(client_id, secret)
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        return str(jwt.get_unverified_header(token)["kid"])

    old_kid = signed_by()
    rotated = cli.json("keys", "rotate-signing", "--publish-delay", "4")
    new_kid = rotated["signer_kid"]
    assert wait_until(
        lambda: new_kid in {k["kid"] for k in service.http.get("/.well-known/jwks.json").json()["keys"]}
    )
    assert len(service.http.get("/.well-known/jwks.json").json()["keys"]) == 2
    assert signed_by() == old_kid  # published, not signing yet
    assert wait_until(lambda: signed_by() == new_kid, timeout=10)
    assert time.time() >= rotated["signs_from"]


def test_the_installed_command_works_on_the_file_store_by_hand(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("SPEECHGATE_")}
    env["SPEECHGATE_STORE_DIR"] = str(tmp_path / "store")
    speechgate = str(Path(sys.executable).parent / "speechgate")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [speechgate, *args], capture_output=True, text=True, env=env, timeout=60, check=False
        )

    rotated = run("keys", "rotate-signing")
    assert rotated.returncode == 0, rotated.stderr
    assert "no Redis configured" in rotated.stderr  # tells how the services will learn of it
    added = run("clients", "add", "by-hand", "--json")
    assert added.returncode == 0, added.stderr
    assert len(json.loads(added.stdout)["client_secret"]) >= 43
    listed = run("keys", "list")
    assert listed.returncode == 0
    assert "signing" in listed.stdout
    assert run("clients", "show", "nobody").returncode == 3


def test_a_damaged_signing_key_is_named_and_a_rotation_replaces_it(cli: Cli) -> None:
    cli("keys", "rotate-signing")

    async def damage() -> None:
        from speechgate.core.keys import SIGNING_KEY_SECRET

        store = cli.deps.open_store(cli.settings)
        await store.set(SIGNING_KEY_SECRET, "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
        await store.close()

    asyncio.run(damage())

    async def keyring() -> str:
        from speechgate.core.keys import load_keyring

        store = cli.deps.open_store(cli.settings)
        try:
            return (await load_keyring(store)).signer.kid
        finally:
            await store.close()

    with pytest.raises(StoreError, match="not a valid PEM key; run `speechgate keys rotate-signing`"):
        asyncio.run(keyring())
    new_kid = cli.json("keys", "rotate-signing")["signer_kid"]
    assert asyncio.run(keyring()) == new_kid  # the damaged version is left out, nothing else lost


def test_a_key_vault_url_that_is_not_https_is_a_usage_error(tmp_path: Path) -> None:
    env = {**os.environ, "SPEECHGATE_KEY_VAULT_URL": "http://vault.example"}
    speechgate = str(Path(sys.executable).parent / "speechgate")
    result = subprocess.run(
        [speechgate, "keys", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 5  # cannot start: an invalid setting
    assert "SPEECHGATE_KEY_VAULT_URL must be an https:// URL" in result.stderr


class FakeArm:
    """Azure Resource Manager's regenerateKey for a Speech resource."""

    def __init__(self) -> None:
        self.keys = {"key1": "1" * 32, "key2": "2" * 32}
        self.calls: list[str] = []

    def app(self) -> Starlette:
        async def regenerate(request: Request) -> Response:
            if not request.headers.get("authorization", "").startswith("Bearer "):
                return Response(
                    status_code=401,
                    headers={
                        "WWW-Authenticate": 'Bearer authorization_uri="https://login.microsoftonline.com/t"'
                    },
                )
            slot = (await request.json())["keyName"].lower()
            self.calls.append(slot)
            self.keys[slot] = slot[-1] * 8 + "f" * 24 if slot == "key1" else "e" * 32
            return JSONResponse({"key1": self.keys["key1"], "key2": self.keys["key2"]})

        path = (
            "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.CognitiveServices/"
            "accounts/{name}/regenerateKey"
        )
        return Starlette(routes=[Route(path, regenerate, methods=["POST"])])


def test_speech_key_rotation_through_the_management_api(vault: Vault, tmp_path: Path) -> None:
    arm = FakeArm()
    with ServerThread(arm.app(), **vault.tls) as server:
        settings = Settings(store_dir=tmp_path, redis_url=None)
        deps = Deps(
            settings=settings,
            open_store=lambda _: vault.store(),
            mgmt_options={
                "base_url": f"https://127.0.0.1:{server.port}",
                "connection_verify": str(vault.ca_path),
            },
        )
        cli = Cli(deps, settings)
        resource = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.CognitiveServices/accounts/speech"
        first = cli.json("keys", "rotate-speech", "--azure-resource", resource, "--yes")
        second = cli.json("keys", "rotate-speech", "--azure-resource", resource, "--yes")
    assert arm.calls == ["key1", "key2"]  # each time the slot that was not in use
    assert (first["slot"], second["slot"]) == ("key1", "key2")
    listed = cli.json("keys", "list")["speechgate-speech-key"]
    assert listed[-1]["slot"] == "key2"
    bad = cli("keys", "rotate-speech", "--azure-resource", "/not/a/resource", "--yes", code=1)
    assert "--azure-resource must be" in bad.output


def test_keys_init_creates_once_and_is_idempotent(cli: Cli) -> None:
    first = cli("keys", "init", "--json")
    made = json.loads(first.stdout)
    assert made["created"] is True
    assert [line["audit"] for line in audit_lines(first)] == ["keys.init"]
    again = cli("keys", "init", "--json")
    assert json.loads(again.stdout) == {"created": False, "signer_kid": made["signer_kid"]}
    assert audit_lines(again) == []


def test_custom_models_voices_and_stored_audio_are_set_per_client(cli: Cli) -> None:
    added = cli.json("clients", "add", "studio", "--custom-models", "model-1,model-2", "--store-audio")
    assert (added["custom_models"], added["custom_voices"], added["store_audio"]) == (
        ["model-1", "model-2"],
        [],
        True,
    )
    changed = cli("quotas", "set", "studio", "--custom-voices", "voice-1", "--no-store-audio", "--json")
    (line,) = audit_lines(changed)
    assert line["changes"] == {"custom_voices": ["voice-1"], "store_audio": False}
    shown = cli.json("clients", "show", "studio")
    assert (shown["custom_models"], shown["custom_voices"], shown["store_audio"]) == (
        ["model-1", "model-2"],
        ["voice-1"],
        False,
    )
    cleared = cli.json(
        "quotas", "set", "studio", "--custom-models", "", "--origins", "https://studio.example"
    )
    assert cleared["limits"]["custom_models"] == []
    assert cleared["limits"]["origins"] == ["https://studio.example"]
    bad = cli("quotas", "set", "studio", "--origins", "studio.example", code=2)  # bad usage
    assert "https://app.example" in bad.output


@pytest.mark.parametrize(
    "command",
    [
        ["keys", "rotate-signing"],
        ["clients", "disable", "CLIENT", "--yes"],
        ["clients", "rotate-secret", "CLIENT", "--yes"],
        ["quotas", "set", "CLIENT", "--streams", "9"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_a_change_with_redis_away_changes_nothing_and_a_rerun_finishes_it(
    tmp_path: Path, command: list[str]
) -> None:
    """Redis configured but not answering: the command says nothing was changed and changes
    nothing (no store change, no audit line); run again with Redis back, it is done once."""
    redis_server = RedisServer(tmp_path)
    settings = Settings(store_dir=tmp_path / "store", redis_url=redis_server.url, redis_prefix="t:")
    cli = Cli(Deps(settings=settings), settings)
    with redis_server:
        cli("keys", "init")
        client_id = cli.json("clients", "add", "app")["client_id"]

    def state() -> tuple[Any, Any]:
        """The store as the CLI shows it (read-only: no Redis needed), less the keys' `age`, which
        the clock moves on between two reads (a second boundary once failed this test)."""
        keys = {name: [{k: v for k, v in key.items() if k != "age"} for key in versions]
                for name, versions in cli.json("keys", "list").items()}  # fmt: skip
        return keys, cli.json("clients", "show", client_id)

    before = state()
    args = [client_id if a == "CLIENT" else a for a in command]
    failed = cli(*args, code=1)
    assert "nothing was changed" in failed.output
    assert not audit_lines(failed)
    assert state() == before
    with redis_server:
        done = cli(*args)
    assert len(audit_lines(done)) == 1
    after = state()
    assert after != before or command[:2] == ["clients", "rotate-secret"]  # a secret is not shown
    if command[:2] == ["keys", "rotate-signing"]:
        assert len(after[0]["speechgate-signing-key"]) == len(before[0]["speechgate-signing-key"]) + 1


def test_a_change_whose_reload_event_fails_is_done_and_says_so(tmp_path: Path) -> None:
    """Redis answers but refuses the event (here: an ACL without PUBLISH): the store change
    stands, the audit line is written, and the command says when the services see it anyway."""
    with RedisServer(tmp_path) as redis_server:
        admin = redis_server.client()
        admin.acl_setuser("cli", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-publish"])
        url = f"redis://cli:pw@127.0.0.1:{redis_server.port}/0"
        settings = Settings(store_dir=tmp_path / "store", redis_url=url, redis_prefix="t:")
        cli = Cli(Deps(settings=settings), settings)
        cli("keys", "init")
        client_id = cli.json("clients", "add", "app")["client_id"]
        done = cli("clients", "disable", client_id, "--yes")
    assert "the change is made, but the reload event could not be sent" in done.stderr
    assert [line["audit"] for line in audit_lines(done)] == ["clients.disable"]
    assert cli.json("clients", "show", client_id)["enabled"] is False


def test_clients_show_prints_values_as_a_person_reads_them(cli: Cli) -> None:
    client_id = cli.json("clients", "add", "reader", "--scope", "speech:recognize")["client_id"]
    text = cli("clients", "show", client_id).stdout
    assert "scopes: speech:recognize\n" in text
    assert "idp: -\n" in text
    assert "enabled: yes\n" in text
    assert "('" not in text
    assert "None" not in text


def test_help_lists_the_exit_codes_with_one_meaning_each() -> None:
    text = CliRunner().invoke(main, ["--help"]).output
    for code, meaning in [
        (0, "done"),
        (1, "failed"),
        (2, "bad usage"),
        (3, "not found"),
        (4, "not confirmed"),
        (5, "cannot start"),
    ]:
        assert f"{code} {meaning}" in " ".join(text.split())
