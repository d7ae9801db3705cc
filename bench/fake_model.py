"""A stand-in job function with a fixed run time, for queue and scaling measurements."""

from __future__ import annotations

import time


def fixed_time_job(payload: dict) -> dict:
    started = time.time()
    time.sleep(payload["work_ms"] / 1000)
    return {"started_at": started, "created_at": payload["created_at"]}
