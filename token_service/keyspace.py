"""The Redis layout: every key and channel name speechgate uses, in one place.

Redis holds only short-lived state. Keys that one operation touches together share a hash tag
(`{client}`) so a single Lua script can reach them on Redis Cluster too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keyspace:
    prefix: str = "sg:"

    def rate(self, client_id: str, policy: str, ident: str, amount: int, window_s: int) -> str:
        """The current-window counter of one rate limit; the previous window is this + '/-1'."""
        return f"{self.prefix}rl:{{{client_id}}}:{policy}:{amount}/{window_s}:{ident}"

    def revoked_jti(self, jti: str) -> str:
        """Present while the token with this `jti` is revoked (TTL: until it can no longer be used)."""
        return f"{self.prefix}revoked:jti:{jti}"

    def revoked_subject(self, client_id: str, subject: str) -> str:
        """When every token of this subject of this client issued until then was revoked."""
        return f"{self.prefix}revoked:{{{client_id}}}:sub:{subject}"

    def revoked_client(self, client_id: str) -> str:
        """When every token of this client issued until then was revoked."""
        return f"{self.prefix}revoked:{{{client_id}}}:all"

    @property
    def events(self) -> str:
        """Pub/sub channel for revocations and key reloads."""
        return f"{self.prefix}events"
