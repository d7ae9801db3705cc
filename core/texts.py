"""What users see and click, shared by the bot (which answers) and the worker (which edits):
queue and progress texts, and the custom ids of result components.

Custom ids carry only an action and a job id; the bot's persistent (dynamic) items match them
with these templates and read the job record from Redis, so they survive bot restarts.
"""

from __future__ import annotations

from collections.abc import Iterable

from core.fleet import format_duration

JOB_ID = r"(?P<job>[A-Za-z0-9_-]{1,80})"
RESULT_ACTIONS = ("reroll", "vary", "delete", "info")
RESULT_TEMPLATE = rf"img:(?P<action>{'|'.join(RESULT_ACTIONS)}):{JOB_ID}"
MODEL_TEMPLATE = rf"img:model:{JOB_ID}"
CANCEL_TEMPLATE = rf"img:cancel:{JOB_ID}"
# Per-image actions on a result (issue 14): Vary (Subtle/Strong) and Upscale ×2 of image
# ``index``, and Remix (a modal with the prompts pre-filled) of the whole job. "vary" above
# stays the older seed Variations, so messages posted before keep working.
IMAGE_ACTIONS = ("subtle", "strong", "upscale")
IMAGE_ACTION_TEMPLATE = (rf"img:(?P<action>{'|'.join(IMAGE_ACTIONS)}):(?P<job_id>[A-Za-z0-9_-]{{1,80}})"
                         rf":(?P<index>[0-9])")
REMIX_TEMPLATE = r"img:remix:(?P<job_id>[A-Za-z0-9_-]{1,80})"
BAR_WIDTH = 12
MAX_CONTENT = 2000  # Discord's limit for a message's text
MAX_EMBED_DESCRIPTION = 4096  # Discord's limit for an embed's description (6,000 for all its text)


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut): user-supplied values
    go into messages, whose length Discord limits."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def lines_within(lines: list[str], limit: int = MAX_EMBED_DESCRIPTION,
                 more: str = "…and {n} more") -> str:
    """``lines`` joined, as many as fit in ``limit`` characters; the rest counted by ``more``."""
    text = "\n".join(lines)
    if len(text) <= limit:
        return text
    shown: list[str] = []
    for index, line in enumerate(lines):  # a few hundred lines at most: joining again is fine
        if len("\n".join([*shown, line, more.format(n=len(lines) - index - 1)])) > limit:
            break
        shown.append(line)
    return clip("\n".join([*shown, more.format(n=len(lines) - len(shown))]), limit)


def result_custom_id(action: str, job_id: str) -> str:
    return f"img:{action}:{job_id}"


def model_custom_id(job_id: str) -> str:
    return f"img:model:{job_id}"


def cancel_custom_id(job_id: str) -> str:
    return f"img:cancel:{job_id}"


def image_action_custom_id(action: str, job_id: str, index: int) -> str:
    """``img:subtle|strong|upscale:{job_id}:{index}`` (index 0–9: Discord posts 10 files)."""
    if action not in IMAGE_ACTIONS or not 0 <= index <= 9:
        raise ValueError(f"no image action {action!r} for image {index}")
    return f"img:{action}:{job_id}:{index}"


def remix_custom_id(job_id: str) -> str:
    return f"img:remix:{job_id}"


def result_file_stem(model: str, seed: int) -> str:
    """A result image's file name without extension (``.png``, or ``.jpg`` when re-encoded to fit,
    and ``SPOILER_`` before it when spoilered): image ``index`` of a job is the one made with
    seed + index, so a button finds its file in the result message by this stem."""
    return f"imagine-{model}-{seed}"


def _images(count: int) -> str:
    return "1 image" if count == 1 else f"{count} images"


def no_worker_text(model: str, minutes: int) -> str:
    """The warning for a job queued on a model that no live worker serves."""
    return (f"⚠️ No GPU worker is serving **{model}** right now: your image will start when one "
            f"comes back, or be cancelled after {minutes} minutes.")


def queued_text(model: str, prompt: str, count: int, position: int, eta_s: float | None,
                no_worker_minutes: int | None = None, notes: Iterable[str] = ()) -> str:
    """``no_worker_minutes``: no live worker serves the model; the job is cancelled after that.
    ``notes``: what the server's rules changed, said when queued and kept by every later edit."""
    eta = f" · ETA ~{format_duration(eta_s)}" if eta_s is not None else ""
    warning = "" if no_worker_minutes is None else f"\n{no_worker_text(model, no_worker_minutes)}"
    told = "".join(f"\nℹ️ {note}" for note in notes)
    return clip(f"🎨 Queued {_images(count)} on **{model}** — position **#{position}** in its queue{eta}."
                f"{warning}\n> {prompt[:300]}{told}", MAX_CONTENT)


def progress_bar(step: int, total: int, width: int = BAR_WIDTH) -> str:
    """``▰▰▰▱▱▱ 12/25``"""
    filled = round(width * step / total) if total else width
    return f"{'▰' * filled}{'▱' * (width - filled)} {step}/{total}"


def generating_text(model: str, prompt: str, count: int, step: int, total: int) -> str:
    return (f"🖌️ Generating {_images(count)} on **{model}** — {progress_bar(step, total)}\n"
            f"> {prompt[:300]}")
