"""A user's own defaults (``/settings``): model, negative prompt, aspect ratio, steps, guidance,
quality (fast mode) and spoilers, on every server.

  UserSettings       the saved values (all optional), small JSON
  check_settings     the operator's limits on them, when saved
  layered            the user's values merged over the server's :class:`Defaults`; the server's
                     rules still apply afterwards (core.policy.apply_policy replaces a default the
                     server forbids with the server's and says so, once per server and rule)
  UserSettingsStore  Redis: ``{prefix}:user:{user_id}`` (the settings) and
                     ``{prefix}:user:{user_id}:told`` (the "told once" marks); keys hold ints
                     only, never user text, and nothing here is a credential
"""

from __future__ import annotations

from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis import Redis

from core.validation import Defaults, InvalidRequest, clean_text, parse_aspect
from settings.catalog import ModelEntry, Quality
from settings.config import Settings

FIELDS = ("model", "negative_prompt", "aspect", "steps", "guidance", "quality", "spoiler")


class UserSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    model: str | None = Field(default=None, max_length=41)
    negative_prompt: str | None = Field(default=None, max_length=2000)  # "": none by default
    aspect: str | None = Field(default=None, max_length=40)  # "16:9" …; a source image's ratio wins
    steps: int | None = Field(default=None, ge=1)
    guidance: float | None = Field(default=None, ge=0)
    quality: Quality | None = None
    spoiler: bool | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in FIELDS)


def check_settings(saved: UserSettings, settings: Settings, catalog: dict[str, ModelEntry]) -> UserSettings:
    """The values cleaned and within the operator's limits (InvalidRequest, shown as is)."""
    model = clean_text(saved.model).lower() or None if saved.model is not None else None
    if model is not None and model not in catalog:
        raise InvalidRequest(f"Unknown model `{model[:80]}`. Choose one of: {', '.join(sorted(catalog))}.")
    negative = None if saved.negative_prompt is None else clean_text(saved.negative_prompt)
    if negative is not None and len(negative) > settings.max_prompt_chars:
        raise InvalidRequest(f"`negative_prompt` is {len(negative)} characters; the limit is "
                             f"{settings.max_prompt_chars}.")
    aspect = clean_text(saved.aspect) or None if saved.aspect is not None else None
    if aspect is not None:
        parse_aspect(aspect)  # the same spellings and limits as /imagine's aspect
    if saved.steps is not None and not 1 <= saved.steps <= settings.max_steps:
        raise InvalidRequest(f"`steps` must be between 1 and {settings.max_steps} (got {saved.steps}).")
    if saved.guidance is not None and not 0 <= saved.guidance <= settings.max_guidance:
        raise InvalidRequest(f"`guidance` must be between 0 and {settings.max_guidance:g} (got {saved.guidance:g}).")
    if saved.quality == "fast" and model is not None and catalog[model].fast is None:
        raise InvalidRequest(f"Fast mode is not available for `{model}`.")
    return saved.model_copy(update={"model": model, "negative_prompt": negative, "aspect": aspect})


def layered(server: Defaults, user: UserSettings | None) -> Defaults:
    """The user's saved values over the server's defaults; ``from_user`` names them."""
    if user is None or user.is_empty():
        return server
    taken = {name: getattr(user, name) for name in FIELDS if getattr(user, name) is not None}
    return replace(server, **taken, from_user=frozenset(taken))


class UserSettingsStore:
    def __init__(self, redis: Redis, prefix: str = "imagine"):
        self.redis, self.prefix = redis, prefix

    def _key(self, user_id: int) -> str:
        return f"{self.prefix}:user:{int(user_id)}"

    def load(self, user_id: int) -> UserSettings | None:
        return self.parse(self.redis.get(self._key(user_id)))

    @staticmethod
    def parse(raw: bytes | str | None) -> UserSettings | None:
        """A stored value (read by :meth:`load`, or in a caller's pipeline) as settings."""
        if raw is None:
            return None
        try:
            return UserSettings.model_validate_json(raw)
        except ValidationError:
            return None  # unreadable (an older layout): as if none were saved

    def save(self, user_id: int, saved: UserSettings) -> None:
        if saved.is_empty():
            self.reset(user_id)
            return
        self.redis.set(self._key(user_id), saved.model_dump_json(exclude_none=True))
        self.redis.delete(self._key(user_id) + ":told")  # new settings: tell about them again

    def update(self, user_id: int, **changes) -> UserSettings:
        current = self.load(user_id) or UserSettings()
        return current.model_copy(update=changes)

    def reset(self, user_id: int) -> None:
        self.redis.delete(self._key(user_id), self._key(user_id) + ":told")

    def first_time(self, user_id: int, guild_id: int | None, rule: str) -> bool:
        """True once per (server, rule): the user is told once that a server replaced a default."""
        mark = f"{int(guild_id) if guild_id is not None else 'web'}:{rule}"
        return bool(self.redis.sadd(self._key(user_id) + ":told", mark))
