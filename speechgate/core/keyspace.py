"""The Redis layout: every key and channel name speechgate uses, in one place.

Redis holds only short-lived state. Keys that one operation touches together share a hash tag
(`{client}`) so a single Lua script can reach them on Redis Cluster too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote


def day(now: float | None = None) -> str:
    """The UTC day daily quotas count in, as the audio keys name it: YYYYMMDD."""
    return time.strftime("%Y%m%d", time.gmtime(now))


def seconds_to_midnight(now: float | None = None) -> int:
    """Whole seconds until the next UTC day begins (when daily quotas start again): at least 1,
    and never short of it (a Retry-After at 0 would send the client back while still refused)."""
    now = time.time() if now is None else now
    return math.ceil(86400 - now % 86400)


def glob_literal(text: str) -> str:
    """`text` as a literal in a SCAN MATCH pattern (`{` and `}` are literal there already)."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def part(value: str) -> str:
    """A value from a request or a token (a subject, an address, a jti) as a key part: encoded
    so that no two values share a key, whatever they hold: no `/` (the previous window's
    `/-1`), `:`, `{}` (hash tags) or glob characters survive; names stay readable."""
    return quote(value, safe="@+=")


def unpart(text: str) -> str:
    return unquote(text)


@dataclass(frozen=True)
class Keyspace:
    prefix: str = "sg:"

    def rate(self, client_id: str, policy: str, ident: str, amount: int, window_s: int) -> str:
        """The current-window counter of one rate limit (its previous window: `previous_window`)."""
        return f"{self.prefix}rl:{{{client_id}}}:{policy}:{amount}/{window_s}:{part(ident)}"

    @staticmethod
    def previous_window(rate: str) -> str:
        """The previous window's counter of the rate limit whose current one is `rate`."""
        return rate + "/-1"

    def rates_pattern(self, client_id: str) -> str:
        """A SCAN MATCH pattern for every rate-limit counter of a client."""
        return glob_literal(f"{self.prefix}rl:{{{client_id}}}:") + "*"

    def revoked_jti(self, jti: str) -> str:
        """Present while the token with this `jti` is revoked (TTL: until it can no longer be used)."""
        return f"{self.prefix}revoked:jti:{part(jti)}"

    def revoked_subject(self, client_id: str, subject: str) -> str:
        """When every token of this subject of this client issued until then was revoked."""
        return f"{self.prefix}revoked:{{{client_id}}}:sub:{part(subject)}"

    def revoked_client(self, client_id: str) -> str:
        """When every token of this client issued until then was revoked."""
        return f"{self.prefix}revoked:{{{client_id}}}:all"

    @property
    def revoked_signing_keys(self) -> str:
        """Set of the kids of signing keys revoked by hand (a leaked key): every token one of them
        signed is refused, whatever its `exp` (whoever holds the key can write any). No TTL: one
        member per revoked key, forever."""
        return f"{self.prefix}revoked:kids"

    # The relay's session state; one client's keys share a hash tag, so one script reaches them.

    def lease_subject(self, client_id: str, subject: str) -> str:
        """Sorted set of live streams of a subject, scored by when each lease runs out (ms)."""
        return f"{self.prefix}lease:{{{client_id}}}:sub:{part(subject)}"

    def lease_client(self, client_id: str) -> str:
        return f"{self.prefix}lease:{{{client_id}}}:all"

    def session(self, client_id: str, jti: str) -> str:
        """When the session a token opened started (ms); present while it may reconnect."""
        return f"{self.prefix}session:{{{client_id}}}:{part(jti)}"

    def resume(self, client_id: str, jti: str) -> str:
        """Hash left by a token's ended Azure-door connection for the one that continues its
        session: `mark` (audio counted up to, on the session's time line) and `budget` (replay
        the session may still send uncounted). Taken once; TTL: what the session has left."""
        return f"{self.prefix}resume:{{{client_id}}}:{part(jti)}"

    def used_jti(self, client_id: str, jti: str) -> str:
        """A single-use token that has opened its session."""
        return f"{self.prefix}used:{{{client_id}}}:{part(jti)}"

    def audio_subject(self, client_id: str, day: str, subject: str) -> str:
        """Audio seconds a subject streamed on `day` (UTC, YYYYMMDD)."""
        return f"{self.prefix}audio:{{{client_id}}}:{day}:sub:{part(subject)}"

    def audio_streams(self, client_id: str, day: str) -> str:
        """Hash of each stream's audio seconds on `day`, as last written: what the relay adds to the
        two counters is the difference, so a write repeated after a timeout counts once."""
        return f"{self.prefix}audio:{{{client_id}}}:{day}:streams"

    def audio_client(self, client_id: str, day: str) -> str:
        return f"{self.prefix}audio:{{{client_id}}}:{day}:all"

    def call_stats(self, client_id: str, what: str, minute: int) -> str:
        """Hash of the calls of another endpoint (`what`: revocations, introspections) accepted
        (`issued`) and refused by the limits in one minute."""
        return f"{self.prefix}stats:{{{client_id}}}:{what}:{minute}"

    def stats(self, client_id: str, minute: int) -> str:
        """Hash of tokens issued and refused in one minute (epoch minutes): `issued`, `refused`,
        and `issued:<subject>`, `refused:<subject>`."""
        return f"{self.prefix}stats:{{{client_id}}}:{minute}"

    def upstream_live(self, name: str) -> str:
        """Sorted set of the live streams on an upstream of the pool, scored by when each lease
        runs out (ms). Every upstream key shares one hash tag: route.lua reads them all at once."""
        return f"{self.prefix}upstream:{{pool}}:live:{part(name)}"

    def upstream_down(self, name: str) -> str:
        """Present while an upstream is marked down after a refusal (its TTL: the backoff)."""
        return f"{self.prefix}upstream:{{pool}}:down:{part(name)}"

    @property
    def events(self) -> str:
        """Pub/sub channel for revocations and key reloads."""
        return f"{self.prefix}events"
