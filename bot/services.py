"""What commands and buttons work with, built once by :mod:`bot.app` and handed to the client;
handlers reach it through :func:`services_of` (typed, unlike ``interaction.client``)."""

from __future__ import annotations

from dataclasses import dataclass

import discord

from core.policy_store import PolicyStore
from core.queue import JobQueue
from core.user_settings import UserSettingsStore
from settings.catalog import ModelEntry
from settings.config import Settings


@dataclass(frozen=True)
class Services:
    settings: Settings
    catalog: dict[str, ModelEntry]
    jobs: JobQueue
    policies: PolicyStore
    user_settings: UserSettingsStore  # each user's own defaults (/settings)

    @classmethod
    def build(cls, settings: Settings, jobs: JobQueue, policies: PolicyStore | None = None) -> Services:
        return cls(settings=settings, catalog=settings.catalog(), jobs=jobs,
                   policies=policies or PolicyStore(jobs.redis, settings.queue_prefix, jobs.job_lifetime_s()),
                   user_settings=UserSettingsStore(jobs.redis, settings.queue_prefix))


def services_of(interaction: discord.Interaction) -> Services:
    """The services of the client that received ``interaction`` (``ImagineBot.services``)."""
    found = getattr(interaction.client, "services", None)
    if not isinstance(found, Services):
        raise TypeError(f"{type(interaction.client).__name__} carries no Services")
    return found
