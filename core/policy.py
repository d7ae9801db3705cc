"""A server's moderation policy as data, and :func:`apply_policy`, the one pure pass every path
into the queue (slash command, buttons, web) makes before enqueueing. In order:

  1. gates           check_channel, check_model: where the command was used and the model it
                     names, before anything else ("not allowed here" beats "unknown model")
  2. resolve         core.validation.resolve_options over server_defaults: every option concrete,
                     with a record of what the user set
  3. server rules    check_image_input (users' own images, when the server forbids them),
                     apply_caps, apply_guidance_floor on the resolved values (a rule that changes
                     or refuses an option, e.g. fast mode or image input, goes here)
  4. operator limits core.validation.check_limits on the final values
  5. text rules      check_terms on the text as queued
  6. build           policy_negative (forced part first), then the one JobRequest
                     (core.validation.request_from), carrying what the worker does with an
                     image its output classifier flags (core.output_policy.nsfw_action_for)

The user's saved settings (core.user_settings) layer over server_defaults before step 1's model
gate (user_layer drops the ones the server forbids, to be told once). Per-user limits are not here:
they need Redis (:func:`core.admission.admit`, :mod:`core.policy_store`), so this module is
unit-testable and cheap (see bench/policy_overhead.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.jobs import Delivery, JobRequest, NsfwAction
from core.matcher import find_banned
from core.output_policy import nsfw_action_for
from core.texts import clip
from core.user_settings import UserSettings, layered
from core.validation import (
    Defaults,
    ImagineOptions,
    InvalidRequest,
    Resolved,
    check_limits,
    clean_text,
    fit_pixels,
    model_key,
    parse_aspect,
    request_from,
    resolve_options,
)
from settings.catalog import ModelEntry
from settings.config import Settings

NEGATIVE_SEPARATOR = ", "
MAX_SIDE = 1 << 16  # sides beyond this are not capped but refused (core.validation.check_limits)
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
    # A server caps pixels (width × height), not a side: any aspect ratio within it works. An
    # Upscale ×2 output over it is refused, never shrunk. Policies stored with the older side
    # cap (``max_size``) load as max_size².
    max_pixels: int | None = Field(default=None, ge=64 * 64)
    clamp: bool = False  # over a cap: clamp to it (True) or refuse the command (False)
    # Image input: users' own attachments (/imagine with an image, and Remix of such a job).
    # Vary and Upscale of the bot's own results stay allowed either way.
    allow_image_input: bool = True
    channels: tuple[int, ...] = ()  # empty: every channel
    max_active_jobs: int | None = Field(default=None, ge=1)  # queued + running, per user
    rate_count: int | None = Field(default=None, ge=1)  # commands per rate_window_s, per user
    rate_window_s: int = Field(default=60, ge=1)
    # Output moderation (core.output_policy): what happens to an image the worker's classifier
    # flags, outside and inside age-restricted channels (Discord's channel.nsfw).
    nsfw_action: NsfwAction = "spoiler"
    nsfw_action_age_restricted: NsfwAction = "off"

    @model_validator(mode="before")
    @classmethod
    def _legacy_size_cap(cls, data):
        if isinstance(data, dict) and "max_size" in data:
            data = dict(data)
            side = data.pop("max_size")
            if data.get("max_pixels") is None and isinstance(side, int) and not isinstance(side, bool):
                data["max_pixels"] = side * side
        return data


class PolicyViolation(InvalidRequest):
    """A command the server's policy refuses; the message names the rule."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"{message} (server rule: {rule})")
        self.rule = rule


class FastModeRefused(PolicyViolation):
    """Fast mode cannot honour one of the server's rules."""


@dataclass(frozen=True)
class Moderated:
    request: JobRequest
    notes: tuple[str, ...] = ()  # what the policy changed, told to the user (e.g. clamped steps)
    # (rule, note) where the server replaced one of the user's saved defaults: told once per
    # server and rule (core.admission filters them through the user's "told" marks).
    user_notes: tuple[tuple[str, str], ...] = ()


def effective_default_model(policy: GuildPolicy, operator_default: str) -> str:
    """The model a command without one runs on here: the server's default, else the operator's,
    whichever this server allows; else its first allowed model (a deny or allow must never leave
    a plain /imagine refused)."""
    for key in (policy.default_model, operator_default):
        if key and (not policy.allowed_models or key in policy.allowed_models):
            return key
    return policy.allowed_models[0]


def server_defaults(policy: GuildPolicy, operator_default: str) -> Defaults:
    return Defaults(model=effective_default_model(policy, operator_default), negative_prompt=policy.default_negative)


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.2f} MP"


def check_channel(policy: GuildPolicy, channel_id: int | None) -> None:
    """No channel (the web): channel allowlists concern Discord channels only."""
    if channel_id is not None and policy.channels and channel_id not in policy.channels:
        where = ", ".join(f"<#{c}>" for c in policy.channels[:CHANNELS_SHOWN])
        if len(policy.channels) > CHANNELS_SHOWN:
            where += f" (and {len(policy.channels) - CHANNELS_SHOWN} more)"
        raise PolicyViolation("channels", f"`/imagine` is not enabled in this channel. Use {where}.")


def check_model(policy: GuildPolicy, key: str) -> None:
    if policy.allowed_models and key not in policy.allowed_models:
        raise PolicyViolation("models", f"Model `{clip(key, 80)}` is not allowed on this server. "
                                        f"Allowed: {', '.join(policy.allowed_models)}.")


def _capped(name: str, value: int, explicit: bool, cap: int | None, clamp: bool,
            notes: list[str]) -> int:
    """``value`` under ``cap``. A defaulted value above the cap is lowered silently; one the user
    set is clamped (with a note) or refused, as the server chose."""
    if cap is None or value <= cap:
        return value
    if not explicit:
        return cap
    if not clamp:
        raise PolicyViolation(f"max {name}", f"`{name}` is limited to {cap} on this server (got {value}).")
    notes.append(f"`{name}` lowered to the server's cap of {cap}")
    return cap


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _capped_pixels(policy: GuildPolicy, resolved: Resolved, notes: list[str]) -> dict:
    """Width and height under the server's pixel cap. A default size above it is lowered
    (aspect ratio kept) silently; one the user chose is lowered with a note or refused, as the
    server chose; an upscale over it is always refused (the cap is on what comes out)."""
    cap, width, height = policy.max_pixels, resolved.width, resolved.height
    if cap is None or not (_whole(width) and _whole(height)) or width * height <= cap:
        return {}
    if max(width, height) > MAX_SIDE:  # nonsense: the operator's limits refuse it, clearly
        return {}
    side = math.isqrt(cap)
    if resolved.mode == "upscale":
        raise PolicyViolation("max pixels", f"An upscale to {width}×{height} is over this server's cap of "
                                            f"{_megapixels(cap)} (about {side}×{side}).")
    smaller = fit_pixels(width, height, cap)
    if resolved.sized_by_user:
        if not policy.clamp:
            raise PolicyViolation("max pixels", f"`{resolved.size_label}` {width}×{height} is over this "
                                                f"server's cap of {_megapixels(cap)} (about {side}×{side}).")
        notes.append(f"size lowered to {smaller[0]}×{smaller[1]} (the server's cap is {_megapixels(cap)})")
    return {"width": smaller[0], "height": smaller[1]}


def apply_caps(policy: GuildPolicy, resolved: Resolved) -> tuple[Resolved, tuple[str, ...]]:
    """The server's caps; (the capped options, notes for the user)."""
    notes: list[str] = []
    capped = {name: _capped(name, getattr(resolved, name), name in resolved.explicit, cap,
                            policy.clamp, notes)
              for name, cap in (("steps", policy.max_steps), ("count", policy.max_count))}
    capped.update(_capped_pixels(policy, resolved, notes))
    return replace(resolved, **capped), tuple(notes)


def user_image_input(resolved: Resolved) -> bool:
    """A source image the user supplied (an attachment, or Remix of such a job), as opposed to
    Vary/Upscale of one of the bot's own results."""
    return resolved.source is not None and resolved.mode == "img2img"


def check_image_input(policy: GuildPolicy, resolved: Resolved) -> None:
    if not policy.allow_image_input and user_image_input(resolved):
        raise PolicyViolation("image input", "This server does not allow image input: use `/imagine` "
                                             "without an image.")


def apply_guidance_floor(policy: GuildPolicy, resolved: Resolved, settings: Settings,
                         ) -> tuple[Resolved, tuple[str, ...]]:
    """A forced negative prompt must be read: diffusers skips classifier-free guidance (and
    never encodes the negative prompt) at guidance <= 1, and weighs it by (guidance - 1) above.
    Below the floor a defaulted guidance is raised silently; one the user set is raised with a
    note or refused, as the server chose for its caps. Every front end and button comes here.

    Fast mode too: an LCM-LoRA runs at guidance 1 (no negative prompt at all), so here it runs
    at the floor instead, and the user is told (classifier-free guidance costs a second UNet
    pass per step). Where the floor is above what the model's fast configuration takes
    (``fast.max_guidance``), fast mode is refused (:class:`FastModeRefused`; apply_policy falls
    back to standard mode, with a note, when fast mode came from the user's saved settings)."""
    floor = settings.forced_negative_min_guidance
    if not policy.forced_negative or resolved.guidance >= floor:
        return resolved, ()
    shown = f"{floor:g}"
    fast = resolved.fast
    if fast is not None and fast.max_guidance is not None and floor > fast.max_guidance:
        raise FastModeRefused(
            "forced negative prompt",
            f"This server adds a negative prompt to every image, which needs `guidance` of at "
            f"least {shown}; fast mode on `{resolved.entry.key}` works only up to "
            f"{fast.max_guidance:g}. Use `quality: standard`.")
    if "guidance" in resolved.explicit and not policy.clamp:
        raise PolicyViolation(
            "forced negative prompt",
            f"This server adds a negative prompt to every image, which needs `guidance` of at "
            f"least {shown} to take effect (got {resolved.guidance:g}).")
    if "guidance" in resolved.explicit or "guidance" in resolved.from_user:
        notes = (f"`guidance` raised to {shown} so the server's negative prompt applies",)
    elif fast is not None:
        notes = (f"fast mode runs at `guidance` {shown} on this server so its negative prompt applies",)
    else:
        notes = ()
    return replace(resolved, guidance=floor), notes


def check_terms(policy: GuildPolicy, prompt: str, negative_prompt: str) -> None:
    """On the text as it will be queued (whitespace collapsed), so the check sees what the model
    reads. The user's negative prompt too, so it cannot smuggle terms in; not the defaults."""
    for field_name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        term = find_banned(text, policy.banned_terms)
        if term is not None:
            raise PolicyViolation("banned terms", f"Your `{field_name}` contains the banned term "
                                                  f"“{term}”. Rephrase it and try again.")


def policy_negative(policy: GuildPolicy, resolved: Resolved) -> str:
    """Forced text first: CLIP reads only 77 tokens, so a long user negative cannot push the
    server's forced negative out of the window."""
    parts = (policy.forced_negative, resolved.negative_or_default)
    return NEGATIVE_SEPARATOR.join(part for part in parts if part)


def _usable_aspect(aspect: str) -> bool:
    try:
        parse_aspect(aspect)
    except InvalidRequest:
        return False
    return True


def user_layer(policy: GuildPolicy, options: ImagineOptions, user: UserSettings | None,
               settings: Settings, catalog: dict[str, ModelEntry],
               ) -> tuple[Defaults, tuple[tuple[str, str], ...]]:
    """The server's defaults with the user's saved settings over them, less the ones this
    server forbids (each replaced by the server's, with a (rule, note) to tell the user once)."""
    server = server_defaults(policy, settings.default_model)
    if user is None:
        return server, ()
    notes: list[tuple[str, str]] = []
    changes: dict = {}
    if user.model and options.model is None and (user.model not in catalog or (
            policy.allowed_models and user.model not in policy.allowed_models)):
        changes["model"] = None
        notes.append(("model", f"your default model `{clip(user.model, 80)}` is not allowed on this "
                               f"server; its default is used"))
    if user.negative_prompt and not clean_text(options.negative_prompt) and find_banned(
            user.negative_prompt, policy.banned_terms) is not None:
        changes["negative_prompt"] = None
        notes.append(("negative_prompt", "your default negative prompt contains a term this server "
                                         "bans; the server's default is used"))
    # Saved under the operator's earlier limits (a default the user no longer types must not
    # refuse every command): the operator's default instead, told once.
    if user.steps is not None and options.steps is None and not 1 <= user.steps <= settings.max_steps:
        changes["steps"] = None
        notes.append(("steps:operator", f"your default `steps` ({user.steps}) is above the limit of "
                                        f"{settings.max_steps}; the model's default is used"))
    if user.guidance is not None and options.guidance is None and not 0 <= user.guidance <= settings.max_guidance:
        changes["guidance"] = None
        notes.append(("guidance:operator", f"your default `guidance` ({user.guidance:g}) is above the "
                                           f"limit of {settings.max_guidance:g}; the model's default is used"))
    if user.aspect and not _usable_aspect(user.aspect):  # saved under other limits
        changes["aspect"] = None
        notes.append(("aspect", f"your default aspect ratio `{clip(user.aspect, 40)}` is not usable; "
                                f"1:1 is used"))
    if user.quality == "fast" and options.quality is None:
        key = model_key(options.model, layered(server, user.model_copy(update=changes)), settings)
        if key in catalog and catalog[key].fast is None:
            changes["quality"] = None
            notes.append((f"quality:{key}", f"fast mode is not available for `{key}`; standard used"))
    return layered(server, user.model_copy(update=changes)), tuple(notes)


def _from_saved_settings(resolved: Resolved, name: str) -> bool:
    """Whether ``name`` came from the user's saved settings rather than this command: directly,
    or through a saved fast mode (which sets steps and guidance)."""
    if name in resolved.explicit:
        return False
    return name in resolved.from_user or ("quality" in resolved.from_user and resolved.fast is not None)


def apply_policy(
    options: ImagineOptions,
    policy: GuildPolicy,
    *,
    job_id: str,
    settings: Settings,
    catalog: dict[str, ModelEntry],
    channel_id: int | None = None,
    channel_nsfw: bool = False,
    delivery: Delivery | None = None,
    created_at: float | None = None,
    store_images: bool = False,
    user: UserSettings | None = None,
) -> Moderated:
    """Options → the moderated :class:`JobRequest`, or :class:`InvalidRequest` (a
    :class:`PolicyViolation` when a server rule refused it). The steps of the module docstring.
    ``user``: the requester's saved settings (core.user_settings), layered over the server's."""
    check_channel(policy, channel_id)
    defaults, user_notes = user_layer(policy, options, user, settings, catalog)
    check_model(policy, model_key(options.model, defaults, settings))
    resolved = resolve_options(options, settings, catalog, defaults)
    check_image_input(policy, resolved)
    resolved, notes = apply_caps(policy, resolved)
    if "steps" in resolved.from_user and policy.max_steps is not None and defaults.steps > policy.max_steps:
        user_notes += (("steps", f"your default `steps` is above this server's cap of {policy.max_steps}; "
                                 f"the cap is used"),)
    try:
        resolved, floor_notes = apply_guidance_floor(policy, resolved, settings)
    except FastModeRefused:
        if "quality" not in resolved.from_user:
            raise
        # Fast mode came from the user's settings: standard mode honours the server's rule.
        defaults = replace(defaults, quality=None)
        user_notes += (("quality:forced_negative", "standard quality used: this server's negative "
                                                   "prompt needs more guidance than fast mode takes"),)
        resolved = replace(resolve_options(options, settings, catalog, defaults), seed=resolved.seed)
        resolved, notes = apply_caps(policy, resolved)
        resolved, floor_notes = apply_guidance_floor(policy, resolved, settings)
    if floor_notes and _from_saved_settings(resolved, "guidance"):  # not a per-command note:
        user_notes += tuple(("guidance:forced_negative", note) for note in floor_notes)  # told once
        floor_notes = ()
    check_limits(resolved, settings)
    check_terms(policy, resolved.prompt, resolved.negative_prompt)
    request = request_from(
        resolved, job_id=job_id, negative_prompt=policy_negative(policy, resolved),
        forced_negative_applied=bool(policy.forced_negative), delivery=delivery,
        created_at=created_at, store_images=store_images,
        nsfw_action=nsfw_action_for(policy, channel_nsfw))
    return Moderated(request, notes + floor_notes, user_notes)
