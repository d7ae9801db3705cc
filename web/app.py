"""The Gradio page: the seed article's demo, now a second front end to the same queue.

    python -m web.app        # http://127.0.0.1:7860 (IMAGINE_WEB_HOST / IMAGINE_WEB_PORT)
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import time
from collections.abc import Iterator

# Gradio reads these when imported: no analytics, no version check, no phoning home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402
from redis.exceptions import RedisError  # noqa: E402

from core.jobs import JobRequest, JobResult  # noqa: E402
from core.logs import configure_logging, secrets_of  # noqa: E402
from core.queue import AlreadyQueued, connect  # noqa: E402
from core.texts import no_worker_text  # noqa: E402
from core.validation import SIZE_STEP, ImagineOptions, InvalidRequest  # noqa: E402
from settings.config import Settings, load_settings  # noqa: E402
from web.jobs import Progress, WebJobs  # noqa: E402
from web.policy import client_address  # noqa: E402

log = logging.getLogger("web")

POLL_S = 0.25
QUEUE_DOWN = "The image queue is unavailable right now. Please try again shortly."
# System fonts only: the page must not fetch anything from the internet.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def progress_text(request: JobRequest, progress: Progress) -> str:
    if progress.state == "queued":
        where = f"#{progress.position}" if progress.position else "next"
        return f"Queued on **{request.model}** — position **{where}** of {progress.waiting or 1}."
    if progress.state == "running":
        return f"Generating on **{request.model}** — step {progress.step}/{progress.steps}."
    if progress.state in ("gone", "expired"):
        return "The job expired before a worker took it. Please try again."
    return "Sorry: your image could not be generated. The operators have the details."


def shown_seeds(result: JobResult) -> list[int]:
    """The seeds of the images output moderation let out (a withheld image's seed is not shown)."""
    actions = [verdict.action for verdict in result.moderation] or ["show"] * len(result.seeds)
    return [seed for seed, action in zip(result.seeds, actions) if action != "withhold"]


def moderation_text(result: JobResult) -> str:
    actions = [verdict.action for verdict in result.moderation]
    withheld, blurred = actions.count("withhold"), actions.count("spoiler")
    parts = []
    if withheld:
        parts.append(f"🚫 {withheld} of {len(actions)} image(s) withheld: flagged as possibly NSFW "
                     f"(or not checkable) under this site's policy.")
    if blurred:
        parts.append(f"⚠️ Content warning: {blurred} image(s) blurred, flagged as possibly NSFW.")
    return "".join(f"\n\n{part}" for part in parts)


def result_text(result: JobResult) -> str:
    t = result.timings
    seeds = ", ".join(map(str, shown_seeds(result))) or "withheld"
    return (f"Done: **{result.model}** · {result.width}×{result.height} · seed{'s' if len(result.seeds) > 1 else ''} "
            f"**{seeds}**\n\nqueue {t.queue_wait_ms:.0f} ms · inference {t.inference_ms:.0f} ms · "
            f"store {t.post_ms:.0f} ms · total {t.total_ms:.0f} ms" + moderation_text(result))


def gallery_items(jobs: WebJobs, result: JobResult) -> list[tuple[Image.Image, str]]:
    """The stored images in order: withheld ones were never stored and are left out; blurred
    ones carry a content warning."""
    actions = [verdict.action for verdict in result.moderation] or ["show"] * len(result.seeds)
    return [(Image.open(io.BytesIO(data)), f"seed {seed}" if action == "show" else "⚠️ content warning (blurred)")
            for data, seed, action in zip(jobs.images(result), result.seeds, actions) if data is not None]


def size_choices(settings: Settings) -> list[int]:
    first = -(-settings.min_size // SIZE_STEP) * SIZE_STEP
    return list(range(first, settings.max_size + 1, SIZE_STEP))


def _whole(name: str, value, *, optional: bool = False) -> int | None:
    """A form number as an int: the browser can send anything (NaN, 1e999, text)."""
    if value is None or value == "":
        if optional:
            return None
        raise InvalidRequest(f"`{name}` is required.")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"`{name}` must be a number.") from None
    if not math.isfinite(number) or abs(number) > 2**53 or not number.is_integer():
        raise InvalidRequest(f"`{name}` must be a whole number.")
    return int(number)


def options_from_form(prompt, negative, model, steps, guidance, seed, count, size,
                      quality="standard") -> ImagineOptions:
    """The page's inputs → options; InvalidRequest for values no control would send. In fast
    mode the steps and guidance sliders are not sent: the model's fast configuration sets them.
    (The web knows no user, so ``/settings`` defaults do not apply here.)"""
    try:
        guidance = float(guidance)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest("`guidance` must be a number.") from None
    if not math.isfinite(guidance):
        raise InvalidRequest("`guidance` must be a number.")
    seed = _whole("seed", seed, optional=True)
    fast = str(quality or "standard") == "fast"
    return ImagineOptions(prompt=str(prompt or ""), negative_prompt=str(negative) if negative else None,
                          model=str(model) if model else None,
                          steps=None if fast else _whole("steps", steps),
                          guidance=None if fast else guidance, seed=None if seed is None or seed < 0 else seed,
                          size=_whole("size", size, optional=True), count=_whole("count", count),
                          quality=str(quality) if quality else None)


def run_job(jobs: WebJobs, options: ImagineOptions, client: str = "unknown") -> Iterator[tuple[str, list]]:
    """Submit, then yield (status text, gallery) until the images are there."""
    try:
        request, position, notes = jobs.submit(options, client)
    except InvalidRequest as error:
        yield f"**Cannot generate:** {error}", []
        return
    except (RedisError, AlreadyQueued) as error:
        log.warning("queue unavailable: %s", error)
        yield QUEUE_DOWN, []
        return
    log.info("queued %s on %s at #%s", request.job_id, request.model, position,
             extra={"job_id": request.job_id})
    changed = "".join(f"\n\nℹ️ {note}" for note in notes)  # e.g. steps lowered to the server's cap
    try:
        if jobs.queue.workers_for(request.model) == 0:  # it can only wait, perhaps until it expires
            minutes = max(1, round(jobs.settings.queue_ttl_s / 60))
            changed = f"\n\n{no_worker_text(request.model, minutes)}{changed}"
    except RedisError as error:
        log.warning("could not count the workers of %s: %s", request.model, error)
    deadline = time.monotonic() + jobs.queue.job_lifetime_s()
    progress = Progress("queued", position, position)
    try:
        while not progress.done and time.monotonic() < deadline:
            yield progress_text(request, progress) + changed, []
            time.sleep(POLL_S)
            try:
                progress = jobs.progress(request)
            except RedisError as error:
                log.warning("queue unavailable while waiting: %s", error)
    finally:
        if not progress.done:  # the page gave up or was closed: nobody will see the images
            _abandon(jobs, request)
    if progress.result is None:
        yield progress_text(request, progress if progress.done else Progress("expired")), []
        return
    yield result_text(progress.result), gallery_items(jobs, progress.result)


def _abandon(jobs: WebJobs, request: JobRequest) -> None:
    try:
        if jobs.abandon(request):
            log.info("web job %s abandoned while queued", request.job_id, extra={"job_id": request.job_id})
    except RedisError as error:  # the queue's own TTL removes it later
        log.warning("could not take web job %s off the queue: %s", request.job_id, error)


def build_ui(jobs: WebJobs) -> gr.Blocks:
    settings, catalog = jobs.settings, jobs.catalog
    default = catalog[settings.default_model]

    def defaults_for(key: str):
        entry = catalog[key]
        size = entry.native_size if entry.native_size in size_choices(settings) else None
        return entry.default_steps, entry.default_guidance, size

    def generate(prompt, negative, model, steps, guidance, seed, count, size, quality, request: gr.Request):
        client = client_address(request.client.host if request.client else None,
                                dict(request.headers), settings)
        try:
            options = options_from_form(prompt, negative, model, steps, guidance, seed, count, size, quality)
        except InvalidRequest as error:
            yield f"**Cannot generate:** {error}", []
            return
        yield from run_job(jobs, options, client)

    with gr.Blocks(title="Imagine", analytics_enabled=False) as ui:
        gr.Markdown("# Imagine\nText to image on the same queue and GPU workers as the Discord bot.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=settings.max_prompt_chars,
                                    placeholder="an orange cat staring off", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1,
                                      placeholder="empty: the server's default negative prompt")
                with gr.Row():
                    model = gr.Dropdown(label="Model", choices=list(catalog), value=default.key)
                    size = gr.Dropdown(label="Size (px)", choices=size_choices(settings),
                                       value=defaults_for(default.key)[2])
                with gr.Row():
                    steps = gr.Slider(1, settings.max_steps, step=1, value=default.default_steps, label="Steps")
                    guidance = gr.Slider(0, settings.max_guidance, step=0.5, value=default.default_guidance,
                                         label="Guidance")
                with gr.Row():
                    seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, elem_id="seed")
                    count = gr.Slider(1, settings.max_count, step=1, value=1, label="Images")
                    quality = gr.Radio(["standard", "fast"], value="standard", label="Quality",
                                       info="fast: the model's fast configuration sets steps and guidance")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(label="Images", columns=2, elem_id="results", format="png")
        model.change(defaults_for, model, [steps, guidance, size])
        inputs = [prompt, negative, model, steps, guidance, seed, count, size, quality]
        button.click(generate, inputs, [status, gallery])
        prompt.submit(generate, inputs, [status, gallery])
    return ui


def main() -> int:
    settings = load_settings()
    configure_logging("web", json_lines=settings.log_format == "json", level=settings.log_level,
                      secrets=secrets_of(settings))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup probes
    ui = build_ui(WebJobs(connect(settings), settings))
    # A handler holds its slot while it watches its job (mostly waiting on Redis): as many as
    # web jobs may be queued, and a bounded line of events behind them, never an unbounded one.
    watchers = settings.web_max_queued or 32
    ui.queue(default_concurrency_limit=watchers, max_size=watchers)
    log.info("web UI on http://%s:%d", settings.web_host, settings.web_port)
    ui.launch(server_name=settings.web_host, server_port=settings.web_port, ssr_mode=False,
              theme=THEME, footer_links=[], quiet=True, show_error=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
