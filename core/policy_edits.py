"""The rules of an admin's policy change, as pure functions: the current :class:`GuildPolicy`
and the admin's input → the new policy, or :class:`InvalidRequest` with a message for the admin.

Front ends apply them through :meth:`core.policy_store.PolicyStore.update` (atomic, audited),
passing :func:`changed_fields` of the old and new policy. An edit that changes nothing returns
an equal policy (the store then records nothing).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from pydantic import ValidationError

from core.matcher import clean_term
from core.output_policy import ACTIONS
from core.policy import GuildPolicy
from core.texts import clip
from core.validation import SIZE_STEP, InvalidRequest, clean_text
from settings.config import Settings

MAX_TERMS = 200
MAX_TERM_CHARS = 100
MAX_CHANNELS = 100


def changed_fields(old: GuildPolicy, new: GuildPolicy) -> dict[str, Any]:
    """The fields ``new`` changes, in the policy's field order (the audit log's order)."""
    return {name: getattr(new, name) for name in GuildPolicy.model_fields
            if getattr(old, name) != getattr(new, name)}


def _with(policy: GuildPolicy, **changes: Any) -> GuildPolicy:
    """``policy`` with ``changes``, validated (model_copy would not check the field limits)."""
    try:
        return GuildPolicy.model_validate({**policy.model_dump(), **changes})
    except ValidationError as error:
        raise InvalidRequest(f"Invalid value: {error.errors()[0]['msg']}") from error


def _appended(policy: GuildPolicy, field: str, value: Any, cap: int, too_many: str) -> GuildPolicy:
    """``value`` added to a list setting: unchanged when it is there already, refused at ``cap``."""
    values = getattr(policy, field)
    if value in values:
        return policy
    if len(values) >= cap:
        raise InvalidRequest(too_many)
    return _with(policy, **{field: (*values, value)})


# -- negative prompts --------------------------------------------------------------------------
def prompt_text(name: str, text: str, max_chars: int) -> str:
    """One line, whitespace collapsed (as prompts are queued), at most ``max_chars``."""
    text = " ".join(text.split())
    if len(text) > max_chars:
        raise InvalidRequest(f"The {name} is {len(text)} characters; the limit is {max_chars}.")
    return text


def set_forced_negative(policy: GuildPolicy, text: str, max_chars: int) -> GuildPolicy:
    return _with(policy, forced_negative=prompt_text("forced negative prompt", text, max_chars))


def clear_forced_negative(policy: GuildPolicy) -> GuildPolicy:
    return _with(policy, forced_negative="")


def set_default_negative(policy: GuildPolicy, text: str, max_chars: int) -> GuildPolicy:
    return _with(policy, default_negative=prompt_text("default negative prompt", text, max_chars))


def clear_default_negative(policy: GuildPolicy) -> GuildPolicy:
    """Back to the operator's default negative prompt."""
    return _with(policy, default_negative=None)


# -- banned terms ------------------------------------------------------------------------------
def banned_term(term: str) -> str:
    """A term as stored (see :func:`core.matcher.clean_term`), or why it cannot be one."""
    cleaned = clean_term(term)
    if not cleaned:
        raise InvalidRequest("A banned term needs at least one letter or digit.")
    if len(cleaned) > MAX_TERM_CHARS:
        raise InvalidRequest(f"A banned term is at most {MAX_TERM_CHARS} characters.")
    return cleaned


def add_banned_term(policy: GuildPolicy, term: str) -> GuildPolicy:
    return _appended(policy, "banned_terms", banned_term(term), MAX_TERMS,
                     f"At most {MAX_TERMS} banned terms per server.")


def remove_banned_term(policy: GuildPolicy, term: str) -> GuildPolicy:
    """Any spelling that cleans to a stored term removes it; an unknown term changes nothing."""
    value = clean_term(term)
    return _with(policy, banned_terms=tuple(t for t in policy.banned_terms if t != value))


# -- models ------------------------------------------------------------------------------------
def catalog_model(model: str, catalog: Collection[str]) -> str:
    key = clean_text(model).lower()
    if key not in catalog:
        raise InvalidRequest(f"Unknown model `{clip(key, 80)}`. Choose one of: {', '.join(sorted(catalog))}.")
    return key


def allow_model(policy: GuildPolicy, model: str, catalog: Collection[str]) -> GuildPolicy:
    """Once any model is allowed, only the allowed ones work."""
    key = catalog_model(model, catalog)
    if key in policy.allowed_models:
        return policy
    return _with(policy, allowed_models=(*policy.allowed_models, key))


def deny_model(policy: GuildPolicy, model: str, catalog: Collection[str]) -> GuildPolicy:
    """Denying from "all models" allows every other catalog model; the server's default model
    goes back to the operator's when it is the one denied."""
    key = catalog_model(model, catalog)
    remaining = tuple(k for k in (policy.allowed_models or tuple(catalog)) if k != key)
    if not remaining:
        raise InvalidRequest("At least one model must stay allowed.")
    default_model = None if policy.default_model == key else policy.default_model
    return _with(policy, allowed_models=remaining, default_model=default_model)


def set_default_model(policy: GuildPolicy, model: str, catalog: Collection[str]) -> GuildPolicy:
    key = catalog_model(model, catalog)
    if policy.allowed_models and key not in policy.allowed_models:
        raise InvalidRequest(f"Allow `{key}` first (`/imagine-admin models allow`).")
    return _with(policy, default_model=key)


def allow_all_models(policy: GuildPolicy) -> GuildPolicy:
    return _with(policy, allowed_models=())


# -- caps and per-user limits ------------------------------------------------------------------
def _cap(name: str, value: int | None, global_max: int, current: int | None) -> int | None:
    """None: keep; 0: remove the cap; else a cap within the operator's global limit."""
    if value is None:
        return current
    if value == 0:
        return None
    if not 1 <= value <= global_max:
        raise InvalidRequest(f"The {name} cap must be between 1 and {global_max} (0 removes it).")
    return value


def set_caps(policy: GuildPolicy, settings: Settings, *, steps: int | None = None,
             count: int | None = None, pixels: int | None = None, clamp: bool | None = None,
             size: int | None = None) -> GuildPolicy:
    """None keeps a setting, 0 removes a cap; ``clamp``: over a cap, clamp (True) or refuse.
    ``pixels``: the most pixels (width × height) of an image, any aspect ratio, upscales
    included; ``size`` (older callers): a side, i.e. ``pixels = size²``."""
    if size is not None and pixels is None:
        if size and (size % SIZE_STEP or size < settings.min_size):
            raise InvalidRequest(f"The size cap must be a multiple of {SIZE_STEP}, at least {settings.min_size}.")
        pixels = size * size if size else 0
    smallest = settings.min_size * settings.min_size
    if pixels and pixels < smallest:
        raise InvalidRequest(f"The pixel cap must be at least {smallest} ({settings.min_size}×{settings.min_size}).")
    return _with(policy,
                 max_steps=_cap("steps", steps, settings.max_steps, policy.max_steps),
                 max_count=_cap("count", count, settings.max_count, policy.max_count),
                 max_pixels=_cap("pixels", pixels, settings.max_pixels, policy.max_pixels),
                 clamp=policy.clamp if clamp is None else clamp)


def set_image_input(policy: GuildPolicy, allowed: bool) -> GuildPolicy:
    """Whether users may give /imagine an image of their own (img2img, and Remix of such a
    job). Vary and Upscale of the bot's own results are not affected."""
    return _with(policy, allow_image_input=bool(allowed))


def set_limits(policy: GuildPolicy, *, max_active: int | None = None, rate: int | None = None,
               window_s: int | None = None) -> GuildPolicy:
    """None keeps a limit, 0 returns it to the operator's default (``IMAGINE_DEFAULT_*``)."""
    changes: dict[str, Any] = {}
    if max_active is not None:
        changes["max_active_jobs"] = max_active or None
    if rate is not None:
        changes["rate_count"] = rate or None
    if window_s is not None:
        changes["rate_window_s"] = window_s
    return _with(policy, **changes)


# -- output moderation -------------------------------------------------------------------------
def set_nsfw_actions(policy: GuildPolicy, *, elsewhere: str | None = None,
                     age_restricted: str | None = None) -> GuildPolicy:
    """What happens to images the output classifier flags ("off", "spoiler", "block"), outside
    and inside age-restricted channels; None keeps a setting."""
    changes: dict[str, Any] = {}
    for field, value in (("nsfw_action", elsewhere), ("nsfw_action_age_restricted", age_restricted)):
        if value is None:
            continue
        if value not in ACTIONS:
            raise InvalidRequest(f"Choose one of: {', '.join(ACTIONS)} (got `{clip(str(value), 40)}`).")
        changes[field] = value
    return _with(policy, **changes)


# -- channels ----------------------------------------------------------------------------------
def allow_channel(policy: GuildPolicy, channel_id: int) -> GuildPolicy:
    """Once any channel is allowed, /imagine works only in the allowed ones."""
    return _appended(policy, "channels", channel_id, MAX_CHANNELS,
                     f"At most {MAX_CHANNELS} channels; `channels clear` lets /imagine work everywhere.")


def remove_channel(policy: GuildPolicy, channel_id: int) -> GuildPolicy:
    return _with(policy, channels=tuple(c for c in policy.channels if c != channel_id))


def allow_all_channels(policy: GuildPolicy) -> GuildPolicy:
    return _with(policy, channels=())
