"""A Redis lease: at most one process at a time holds a named role (syncing the command tree,
running the expiry sweep) while several bot processes run at once.

``SET key owner NX PX ttl`` takes a free lease; its holder renews it with a compare-and-set
(only while the key still names it) and gives it up the same way, so a process that lost its
lease (paused past the TTL, then another took it) can never extend or delete the new holder's.
A holder that dies stops renewing: the lease runs out and the next process to try takes it
within ``ttl`` (plus that process's retry interval). Blocking (Redis): the bot calls these in a
thread.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from redis import Redis

# Renew when we hold it, take it when it is free; 1 when the caller holds it afterwards.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
if not holder and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def process_identity() -> str:
    """Who holds a lease: host, pid and a random part (a pid is reused after a restart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    def __init__(self, redis: Redis, key: str, ttl_s: float, owner: str | None = None):
        self.redis = redis
        self.key = key
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.owner = owner or process_identity()
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self._valid_until = 0.0  # monotonic; what this process last knew for sure

    def acquire(self) -> bool:
        """Take or renew the lease; True while this process holds it. A Redis error propagates
        (and :attr:`held` turns False once the last renewal has run out)."""
        started = time.monotonic()
        got = bool(self._acquire(keys=[self.key], args=[self.owner, self.ttl_ms]))
        self._valid_until = started + self.ttl_ms / 1000 if got else 0.0
        return got

    @property
    def held(self) -> bool:
        """Held as of the last successful :meth:`acquire`, and not yet run out since."""
        return time.monotonic() < self._valid_until

    def release(self) -> bool:
        """Give the lease up if this process still holds it (another may take it at once)."""
        self._valid_until = 0.0
        return bool(self._release(keys=[self.key], args=[self.owner]))

    def holder(self) -> str | None:
        value = self.redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value
