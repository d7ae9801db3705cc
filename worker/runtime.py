"""What a worker process holds for every job it runs: the resident pipelines, its Redis
connection and the stores built on it, the HTTP session to Discord.

RQ calls job functions by name with JSON arguments only, so the worker process installs its
runtime once (:func:`install_runtime`) and each job, hook and callback looks it up
(:func:`current_runtime`) — the place of arq's per-worker ``ctx``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

import requests
from redis import Redis

from core.fleet import FleetStats
from core.records import RecordStore
from settings.catalog import ModelEntry
from settings.config import Settings
from worker.batching import BatchPlan
from worker.outcomes import Outcomes
from worker.pipelines import ResidentPipelines
from worker.progress import EditGate
from worker.safety import SafetyChecker


@dataclass
class WorkerRuntime:
    pipelines: ResidentPipelines
    redis: Redis  # shared state: fleet latency, job records, edit gates, outcomes
    outcomes: Outcomes  # who was told what, so a rerun job never posts twice
    settings: Settings = field(default_factory=Settings)
    session: requests.Session = field(default_factory=requests.Session)
    batches: BatchPlan = field(default_factory=BatchPlan)
    bot_token: str | None = field(default=None, repr=False)  # channel fallback for expired tokens
    # The output classifier, loaded once at start; None fails every check closed (images withheld).
    safety: SafetyChecker | None = None
    # One background thread refreshes queue positions, so a job never waits on those edits.
    background: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "queue-refresh"))

    @cached_property
    def catalog(self) -> dict[str, ModelEntry]:
        """Built once: the result buttons' model select needs it for every job."""
        return self.settings.catalog()

    @property
    def key_prefix(self) -> str:
        return self.settings.queue_prefix

    def stats(self) -> FleetStats:
        return FleetStats(self.redis, self.key_prefix, self.settings.latency_samples,
                          self.settings.eta_min_samples)

    def records(self) -> RecordStore:
        return RecordStore(self.redis, self.key_prefix, self.settings.record_ttl_s)

    def gate(self) -> EditGate:
        return EditGate(self.redis, self.key_prefix, self.settings.progress_interval_s)


_installed: WorkerRuntime | None = None


def install_runtime(runtime: WorkerRuntime) -> None:
    global _installed
    _installed = runtime


def installed_runtime() -> WorkerRuntime | None:
    """The runtime, or None outside a worker process (RQ also runs callbacks in other processes)."""
    return _installed


def current_runtime() -> WorkerRuntime:
    if _installed is None:
        raise RuntimeError("no worker runtime installed: run jobs with `python -m worker.main`")
    return _installed
