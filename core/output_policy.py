"""Output moderation as pure decisions: which action applies to a job's flagged images, and what
happens to each image once the worker's classifier has spoken.

  nsfw_action_for  the server's policy and the channel (age-restricted or not) → what a flagged
                   image of this job becomes ("off", "spoiler", "block"); resolved at admission
                   and carried in the JobRequest, so the worker needs no policy lookup
  image_action     that action, the user's wish for spoilers and the classifier's verdict →
                   "show", "spoiler" or "withhold" for one image; a failed check (verdict None)
                   withholds whenever the server moderates (fail closed, never open)
  notice           what the user is told about spoilered and withheld images

The classifier itself runs in the worker (:mod:`worker.safety`); nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from core.jobs import ImageAction, NsfwAction

if TYPE_CHECKING:  # core.policy applies this module at admission
    from core.policy import GuildPolicy

ACTIONS: tuple[NsfwAction, ...] = ("off", "spoiler", "block")


def nsfw_action_for(policy: "GuildPolicy", channel_nsfw: bool) -> NsfwAction:
    """An age-restricted channel has its own setting, so a server can allow there what it blocks
    elsewhere. The web has no channel: it gets the server's general setting."""
    return policy.nsfw_action_age_restricted if channel_nsfw else policy.nsfw_action


def image_action(action: NsfwAction, spoiler: bool, flagged: bool | None) -> ImageAction:
    """One image's fate. ``flagged`` None: the classifier failed on this job; the image is
    withheld unless the server does not moderate output at all ("off": nothing to enforce)."""
    if flagged is None and action != "off":
        return "withhold"
    if flagged and action == "block":
        return "withhold"
    if (flagged and action == "spoiler") or spoiler:
        return "spoiler"
    return "show"


def image_actions(action: NsfwAction, spoiler: bool,
                  flags: Sequence[bool] | None, count: int) -> list[ImageAction]:
    """Every image's action; ``flags`` None: the check failed for the whole job."""
    verdicts = [None] * count if flags is None else list(flags)
    return [image_action(action, spoiler, flagged) for flagged in verdicts]


def _numbers(indices: list[int]) -> str:
    return ", ".join(str(i + 1) for i in indices)


def notice(actions: Sequence[ImageAction], flags: Sequence[bool] | None) -> str:
    """The line the user reads above their images: which were withheld (and why), which carry a
    content warning. Empty when nothing was moderated. Images are named by position (1-based),
    not by seed: a withheld image's seed would let anyone make it again elsewhere."""
    total = len(actions)
    which = "" if total == 1 else " {} of " + str(total)
    lines = []
    withheld = [i for i, a in enumerate(actions) if a == "withhold"]
    if withheld:
        what = "Your image was" if total == 1 else f"Image{'s' if len(withheld) > 1 else ''}" \
            f"{which.format(_numbers(withheld))} {'were' if len(withheld) > 1 else 'was'}"
        why = ("the content check failed, so it was withheld to be safe" if flags is None
               else "flagged as possibly NSFW; this server withholds such images here")
        lines.append(f"🚫 {what} withheld: {why}.")
    warned = [i for i, a in enumerate(actions) if a == "spoiler" and flags is not None and flags[i]]
    if warned:
        what = "this image" if total == 1 else f"image{'s' if len(warned) > 1 else ''}" \
            f"{which.format(_numbers(warned))}"
        lines.append(f"⚠️ Content warning: {what} may be NSFW (shown as a spoiler).")
    return "\n".join(lines)
