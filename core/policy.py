"""A server's moderation policy as data, and :func:`apply_policy`, the one pure function every
path into the queue (slash command now; buttons and web later) calls before enqueueing.

No I/O here: the policy is loaded and the per-user limits are enforced by
:mod:`core.policy_store`, so this module is unit-testable and cheap (see bench/policy_overhead.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field

from core.matcher import find_banned
from settings.catalog import ModelEntry
from settings.config import Settings
from core.jobs import Delivery, JobRequest
from core.texts import clip
from core.validation import ImagineOptions, InvalidRequest, build_request

NEGATIVE_SEPARATOR = ", "
CHANNELS_SHOWN = 10  # in a refusal; the rest are counted


class GuildPolicy(BaseModel):
    """One server's rules. Empty lists and ``None`` caps mean "no restriction"."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    forced_negative: str = ""
    default_negative: str | None = None  # None: the operator's default (Settings)
    banned_terms: tuple[str, ...] = ()
    allowed_models: tuple[str, ...] = ()  # empty: every catalog model
    default_model: str | None = None  # None: the operator's default
    max_steps: int | None = Field(default=None, ge=1)
    max_count: int | None = Field(default=None, ge=1)
    max_size: int | None = Field(default=None, ge=64)
    clamp: bool = False  # over a cap: clamp to it (True) or refuse the command (False)
    channels: tuple[int, ...] = ()  # empty: every channel
    max_active_jobs: int | None = Field(default=None, ge=1)  # queued + running, per user
    rate_count: int | None = Field(default=None, ge=1)  # commands per rate_window_s, per user
    rate_window_s: int = Field(default=60, ge=1)


class PolicyViolation(InvalidRequest):
    """A command the server's policy refuses; the message names the rule."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"{message} (server rule: {rule})")
        self.rule = rule


@dataclass(frozen=True)
class Moderated:
    request: JobRequest
    notes: tuple[str, ...] = ()  # what the policy changed, told to the user (e.g. clamped steps)


def combined_negative(policy: GuildPolicy, user_negative: str, settings: Settings) -> str:
    """Forced text first: CLIP reads only 77 tokens, so a long user negative cannot push the
    server's forced negative out of the window."""
    base = user_negative or (settings.default_negative_prompt if policy.default_negative is None
                             else policy.default_negative)
    return NEGATIVE_SEPARATOR.join(part for part in (policy.forced_negative, base) if part)


def check_channel(policy: GuildPolicy, channel_id: int | None) -> None:
    if policy.channels and channel_id not in policy.channels:
        where = ", ".join(f"<#{c}>" for c in policy.channels[:CHANNELS_SHOWN])
        if len(policy.channels) > CHANNELS_SHOWN:
            where += f" (and {len(policy.channels) - CHANNELS_SHOWN} more)"
        raise PolicyViolation("channels", f"`/imagine` is not enabled in this channel. Use {where}.")


def choose_model(policy: GuildPolicy, requested: str | None, settings: Settings) -> str:
    key = (requested or policy.default_model or settings.default_model).strip().lower()
    if policy.allowed_models and key not in policy.allowed_models:
        raise PolicyViolation("models", f"Model `{clip(key, 80)}` is not allowed on this server. "
                                        f"Allowed: {', '.join(policy.allowed_models)}.")
    return key


def _capped(name: str, asked: int | None, default: int, cap: int | None, clamp: bool,
            notes: list[str]) -> int | None:
    """The value to use under ``cap``. An unset option above the cap is lowered silently;
    an explicit one is clamped (with a note) or refused, as the server chose."""
    value = default if asked is None else asked
    if cap is None or value <= cap:
        return asked
    if asked is None:
        return cap
    if not clamp:
        raise PolicyViolation(f"max {name}", f"`{name}` is limited to {cap} on this server (got {asked}).")
    notes.append(f"`{name}` lowered to the server's cap of {cap}")
    return cap


def check_terms(policy: GuildPolicy, prompt: str, negative_prompt: str) -> None:
    """On the text as it will be queued (whitespace collapsed), so the check sees what the
    model reads."""
    for field_name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        term = find_banned(text, policy.banned_terms)
        if term is not None:
            raise PolicyViolation("banned terms", f"Your `{field_name}` contains the banned term "
                                                  f"“{term}”. Rephrase it and try again.")


def apply_policy(
    options: ImagineOptions,
    policy: GuildPolicy,
    *,
    job_id: str,
    settings: Settings,
    catalog: dict[str, ModelEntry],
    channel_id: int | None = None,
    delivery: Delivery | None = None,
    created_at: float | None = None,
) -> Moderated:
    """Options → the moderated :class:`JobRequest`, or :class:`InvalidRequest` (a
    :class:`PolicyViolation` when a server rule refused it). Per-user limits are not here:
    they need Redis (:meth:`core.policy_store.PolicyStore.admit`)."""
    check_channel(policy, channel_id)
    model = choose_model(policy, options.model, settings)
    entry = catalog.get(model)
    notes: list[str] = []
    if entry is not None:  # an unknown model is reported by build_request
        options = replace(
            options, model=model,
            steps=_capped("steps", options.steps, entry.default_steps, policy.max_steps, policy.clamp, notes),
            count=_capped("count", options.count, 1, policy.max_count, policy.clamp, notes),
            size=_capped("size", options.size, entry.native_size, policy.max_size, policy.clamp, notes),
        )
    request = build_request(options, job_id=job_id, settings=settings, catalog=catalog,
                            delivery=delivery, created_at=created_at)
    user_negative = request.negative_prompt if (options.negative_prompt or "").strip() else ""
    check_terms(policy, request.prompt, user_negative)
    request = request.model_copy(update={
        "negative_prompt": combined_negative(policy, user_negative, settings),
        "forced_negative_applied": bool(policy.forced_negative),
    })
    return Moderated(request, tuple(notes))
