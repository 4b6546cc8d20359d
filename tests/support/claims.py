"""An access token's claims for tests that need one without a token service: valid for the next
5 minutes; each test names what it cares about."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from speechgate.core.claims import AccessClaims


def access_claims(**changes: Any) -> AccessClaims:
    now = int(time.time())
    base = AccessClaims(
        iss="https://auth.test",
        aud="speechgate",
        sub="alice",
        client_id="app",
        scope="speech:recognize",
        iat=now,
        nbf=now,
        exp=now + 300,
        jti="j1",
        max_session_s=600,
    )
    return replace(base, **changes)
