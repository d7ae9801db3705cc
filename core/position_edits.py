"""Who may still edit a queued job's message: queue-position edits come from any worker, the
final text (a result, a cancel or an expiry notice) from one place. A position edit runs under a
short Redis lease and only while the job is not final; whoever posts the final text marks the
job final first and waits out a lease in flight, so a slow (retried) position edit can never
replace it. Keys: ``{prefix}:final:{job}`` and ``{prefix}:position-edit:{job}``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from redis import Redis


class PositionEdits:
    """The lease and the final mark of the module docstring, for one key prefix."""

    def __init__(self, redis: Redis, prefix: str, lease_s: float = 15.0):
        self.redis, self.prefix, self.lease_s = redis, prefix, lease_s

    def _keys(self, job_id: str) -> tuple[str, str]:
        return f"{self.prefix}:final:{job_id}", f"{self.prefix}:position-edit:{job_id}"

    @contextmanager
    def position_edit(self, job_id: str) -> Iterator[bool]:
        """Yields whether the edit may go out now."""
        final, editing = self._keys(job_id)
        if not self.redis.set(editing, 1, nx=True, px=int(self.lease_s * 1000)):
            yield False
            return
        try:
            yield not self.redis.exists(final)
        finally:
            self.redis.delete(editing)

    def finalize(self, job_id: str) -> None:
        final, editing = self._keys(job_id)
        self.redis.set(final, 1, ex=3600)
        deadline = time.monotonic() + self.lease_s
        while self.redis.exists(editing) and time.monotonic() < deadline:
            time.sleep(0.05)
