"""Client policies and settings: bad documents and variables get messages that say what to fix."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from speechgate.core.clients import ClientPolicy, PolicyError
from speechgate.core.settings import Settings, SettingsError

GOOD: dict[str, Any] = {"client_id": "my-app", "secret_hash": "hmac-sha256:00"}

BAD_POLICIES: dict[str, tuple[dict[str, Any], str]] = {
    "bad id": ({"client_id": "My App"}, "client_id must be"),
    "unknown field": ({"colour": "red"}, "unknown policy fields: colour"),
    "unknown scope": ({"scopes": ["speech:everything"]}, "scopes must be"),
    "scopes not a list": ({"scopes": "speech:recognize"}, "scopes must be a list"),
    "bad language": ({"languages": ["english"]}, "language 'english'"),
    "ttl too long": ({"token_ttl_s": 86400}, "token_ttl_s must be between"),
    "negative quota": ({"max_streams_per_subject": -1}, "max_streams_per_subject"),
    # a session's window is kept in Redis with that expiry, and Redis refuses an expiry of 0
    "session of no time": ({"max_session_s": 0}, "max_session_s must be at least 1 second"),
    "bad rate limit": ({"rate_limits": {"client": "lots"}}, "rate_limits.client 'lots'"),
    "unknown rate limit kind": ({"rate_limits": {"tenant": "1/minute"}}, "client, subject and ip"),
    "public without idp": ({"secret_hash": None}, "needs an identity provider"),
    "HMAC idp algorithm": (
        {"idp": {"issuer": "https://i", "jwks_uri": "https://i/k", "audience": "a", "algorithms": ["HS256"]}},
        "asymmetric",
    ),
    "idp without jwks": ({"idp": {"issuer": "https://i", "audience": "a"}}, "idp needs"),
}


@pytest.mark.parametrize("case", list(BAD_POLICIES))
def test_invalid_policy_is_refused_with_the_field_named(case: str) -> None:
    changes, words = BAD_POLICIES[case]
    with pytest.raises(PolicyError, match=words.replace("(", r"\(")):
        ClientPolicy.from_dict({**GOOD, **changes})


def test_policy_round_trips_through_json() -> None:
    policy = ClientPolicy.from_dict({**GOOD, "languages": ["en-US"], "rate_limits": {"client": "5/second"}})
    assert ClientPolicy.from_json(policy.to_json()) == policy


def test_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "SPEECHGATE_PORT": "9000",
            "REDIS_URL": "redis://r:6379/1",
            "SPEECHGATE_STORE_DIR": "/srv/speechgate",
            "SPEECHGATE_CLIENT_CACHE_S": "2.5",
        }
    )
    assert (settings.port, settings.redis_url, settings.store_dir, settings.client_cache_s) == (
        9000,
        "redis://r:6379/1",
        Path("/srv/speechgate"),
        2.5,
    )
    assert (settings.host, settings.relay_port) == ("127.0.0.1", 8001)


def test_speechgate_redis_url_wins_over_redis_url() -> None:
    env = {"SPEECHGATE_REDIS_URL": "redis://a:1/0", "REDIS_URL": "redis://b:2/0"}
    assert Settings.from_env(env).redis_url == "redis://a:1/0"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        (
            {"SPEECHGATE_PORT": "eighty"},
            re.escape("SPEECHGATE_PORT='eighty' is not a whole number (e.g. SPEECHGATE_PORT=8000)"),
        ),
        ({"SPEECHGATE_PORT": "70000"}, "SPEECHGATE_PORT must be a port number"),
        ({"SPEECHGATE_KEY_VAULT_URL": "http://vault"}, "must be an https:// URL"),
        ({"SPEECHGATE_ISSUER": "tokens.example"}, "SPEECHGATE_ISSUER must be"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        Settings.from_env(env)
