"""The Gradio page: the seed article's demo, now a second front end to the same queue.

    python -m web.app        # http://127.0.0.1:7860 (IMAGINE_WEB_HOST / IMAGINE_WEB_PORT)
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator

if __name__ == "__main__":  # docker stop while Gradio imports and starts (seconds): exit 0, not 143
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # main() hands over to stop_on_sigterm

# Gradio reads these when imported: no analytics, no version check, no phoning home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402
from redis.exceptions import RedisError  # noqa: E402

from core.demo import NOTICE as DEMO_NOTICE  # noqa: E402
from core.demo import random_weights  # noqa: E402
from core.entry import no_options  # noqa: E402
from core.health import redis_ready, require_free_port, serve_health, stop_on_sigterm  # noqa: E402
from core.jobs import JobRequest, JobResult, SourceImage  # noqa: E402
from core.logs import configure_logging, secrets_of  # noqa: E402
from core.policy import effective_default_model  # noqa: E402
from core.queue import AlreadyQueued, connect  # noqa: E402
from core.texts import no_worker_text  # noqa: E402
from core.validation import (  # noqa: E402
    ASPECT_RATIOS,
    DEFAULT_STRENGTH,
    MAX_SEED,
    UPSCALE_STRENGTH,
    VARY_STRENGTHS,
    ImagineOptions,
    InvalidRequest,
    upscale_dimensions,
)
from settings.config import Settings, load_settings  # noqa: E402
from web.jobs import Progress, WebJobs  # noqa: E402
from web.policy import client_address, joined_headers  # noqa: E402

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


def mode_text(result: JobResult) -> str:
    """How an image-to-image result was made: mode, strength and the source file's sha256."""
    record = result.reproducibility
    if record is None or record.mode == "txt2img":
        return ""
    strength = "" if record.strength is None else f" · strength {record.strength:g}"
    source = f" · source sha256 `{record.source_sha256}`" if record.source_sha256 else ""
    return f"\n\n{record.mode}{strength}{source}"


def result_text(result: JobResult) -> str:
    t = result.timings
    seeds = ", ".join(map(str, shown_seeds(result))) or "withheld"
    return (f"Done: **{result.model}** · {result.width}×{result.height} · seed{'s' if len(result.seeds) > 1 else ''} "
            f"**{seeds}**\n\nqueue {t.queue_wait_ms:.0f} ms · inference {t.inference_ms:.0f} ms · "
            f"store {t.post_ms:.0f} ms · total {t.total_ms:.0f} ms" + mode_text(result) + moderation_text(result))


def gallery_items(jobs: WebJobs, result: JobResult) -> list[tuple[Image.Image, str]]:
    """The stored images in order: withheld ones were never stored and are left out; blurred
    ones carry a content warning."""
    actions = [verdict.action for verdict in result.moderation] or ["show"] * len(result.seeds)
    return [(Image.open(io.BytesIO(data)), f"seed {seed}" if action == "show" else "⚠️ content warning (blurred)")
            for data, seed, action in zip(jobs.images(result), result.seeds, actions) if data is not None]


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


AUTO_ASPECT = "auto"  # the aspect dropdown's default: square, or the uploaded image's ratio


def _finite(name: str, value) -> float:
    """A form field as a finite number; InvalidRequest naming the field otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"`{name}` must be a number.") from None
    if not math.isfinite(number):
        raise InvalidRequest(f"`{name}` must be a number.")
    return number


def options_from_form(prompt, negative, model, steps, guidance, seed, count, size=None,
                      quality="standard", *, aspect=None, strength=None,
                      source: SourceImage | None = None) -> ImagineOptions:
    """The page's inputs → options; InvalidRequest for values no control would send. In fast
    mode the steps and guidance sliders are not sent: the model's fast configuration sets them.
    ``aspect``: a preset ratio (AUTO_ASPECT or empty: square, or the image's ratio). ``source``:
    the uploaded image (:meth:`WebJobs.store_upload`); ``strength`` is sent only with one.
    (The web knows no user, so ``/settings`` defaults do not apply here.)"""
    guidance = _finite("guidance", guidance)
    seed = _whole("seed", seed, optional=True)
    fast = str(quality or "standard") == "fast"
    return ImagineOptions(prompt=str(prompt or ""), negative_prompt=str(negative) if negative else None,
                          model=str(model) if model else None,
                          steps=None if fast else _whole("steps", steps),
                          guidance=None if fast else guidance, seed=None if seed is None or seed < 0 else seed,
                          size=_whole("size", size, optional=True), count=_whole("count", count),
                          quality=str(quality) if quality else None,
                          aspect=None if not aspect or str(aspect) == AUTO_ASPECT else str(aspect),
                          source=source,
                          strength=None if source is None or strength is None else _finite("strength", strength))


def shown_images(result: JobResult) -> list[dict]:
    """The images a user can Vary or Upscale, in gallery order: stored and shown as they are
    (a withheld one is not stored, a blurred one is not the image)."""
    actions = [verdict.action for verdict in result.moderation] or ["show"] * len(result.seeds)
    return [{"key": key, "seed": seed, "shown": action == "show"}
            for key, seed, action in zip(result.image_keys, result.seeds, actions) if key]


def last_job(options: ImagineOptions, request: JobRequest, result: JobResult) -> dict:
    """What the page keeps of its latest result for the Vary and Upscale buttons (JSON)."""
    form = {name: value for name, value in dataclasses.asdict(options).items() if name != "source"}
    return {"options": form, "model": request.model, "width": result.width, "height": result.height,
            "images": shown_images(result)}


def action_options(last: dict | None, action: str, number) -> ImagineOptions:
    """Vary (``subtle``/``strong``) or Upscale ×2 (``upscale``) of image ``number`` (1-based, in
    the gallery) of the page's latest result: img2img of the stored PNG, the same prompt and
    model; Vary with new seeds, Upscale at twice the size with that image's seed. ``last`` is the
    session's ``gr.State``, kept on the server (a client sends only ``number``): a page varies only
    the results it was shown itself, never another visitor's by naming its key."""
    if not last or not last.get("images"):
        raise InvalidRequest("Generate an image first, then pick one in the gallery.")
    images = last["images"]
    index = _whole("image", number)
    if not 1 <= index <= len(images):
        raise InvalidRequest(f"Pick an image from 1 to {len(images)}.")
    image = images[index - 1]
    if not image.get("shown", True):
        raise InvalidRequest("That image was blurred by the content check: it cannot be varied or upscaled.")
    source = SourceImage(image_key=image["key"], filename=f"image-{index}.png", content_type="image/png",
                         width=last["width"], height=last["height"])
    base = {**last["options"], "model": last["model"], "source": source, "aspect": None, "size": None,
            "width": None, "height": None}
    if action == "upscale":
        width, height = upscale_dimensions(last["width"], last["height"])
        seed = image["seed"] % (MAX_SEED + 1)  # a result made before seeds wrapped may be past it
        return ImagineOptions(**{**base, "mode": "upscale", "strength": UPSCALE_STRENGTH, "seed": seed,
                                 "count": 1, "width": width, "height": height})
    return ImagineOptions(**{**base, "mode": "vary", "strength": VARY_STRENGTHS[action], "seed": None})


def run_job(jobs: WebJobs, options: ImagineOptions, client: str = "unknown",
            finished: dict | None = None) -> Iterator[tuple[str, list]]:
    """Submit, then yield (status text, gallery) until the images are there. ``finished`` gets
    :func:`last_job` of a result (for the Vary and Upscale buttons). An uploaded source image
    is deleted once the job has ended (or was never queued)."""
    try:
        request, position, notes = jobs.submit(options, client)
    except InvalidRequest as error:
        _discard_upload(jobs, options.source)
        yield f"**Cannot generate:** {error}", []
        return
    except (RedisError, AlreadyQueued) as error:
        log.warning("queue unavailable: %s", error)
        _discard_upload(jobs, options.source)
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
        ended = progress.done
        if not progress.done:  # the page gave up or was closed: nobody will see the images
            ended = _abandon(jobs, request)
        if ended:
            _discard_upload(jobs, request.source)
    if progress.result is None:
        failure = progress.failure if progress.done else None
        yield (f"**Cannot generate:** {failure}" if failure else
               progress_text(request, progress if progress.done else Progress("expired"))), []
        return
    if finished is not None:
        finished.update(last_job(options, request, progress.result))
    yield result_text(progress.result), gallery_items(jobs, progress.result)


def _discard_upload(jobs: WebJobs, source: SourceImage | None) -> None:
    try:
        jobs.discard_upload(source)
    except RedisError as error:  # it expires on its own
        log.warning("could not delete an uploaded image: %s", error)


def _abandon(jobs: WebJobs, request: JobRequest) -> bool:
    """True when the job was taken off the queue (it will never run)."""
    try:
        if jobs.abandon(request):
            log.info("web job %s abandoned while queued", request.job_id, extra={"job_id": request.job_id})
            return True
    except RedisError as error:  # the queue's own TTL removes it later
        log.warning("could not take web job %s off the queue: %s", request.job_id, error)
    return False


def request_client(request: gr.Request, settings: Settings) -> str:
    """The page's client address (web.policy.client_address), every header line counted."""
    return client_address(request.client.host if request.client else None,
                          joined_headers(request.headers.items()), settings)


def build_ui(jobs: WebJobs) -> gr.Blocks:
    settings, catalog = jobs.settings, jobs.catalog
    default = catalog[settings.default_model]

    def defaults_for(key: str):
        entry = catalog[key]
        return entry.default_steps, entry.default_guidance

    def model_now() -> str:
        """The web policy's default model as it is now (read at each page load, so an admin's
        `models default|allow|deny` reaches the untouched form as it reaches /imagine)."""
        try:
            policy = jobs.policies.load(settings.web_policy_guild_id)
        except (RedisError, ValueError) as error:
            log.warning("web policy unavailable: %s", error)
            return default.key
        key = effective_default_model(policy, settings.default_model)
        return key if key in catalog else default.key

    def client_of(request: gr.Request) -> str:
        return request_client(request, settings)

    def generate(prompt, negative, model, steps, guidance, seed, count, aspect, quality, image, strength,
                 request: gr.Request):
        finished: dict = {}
        source = None
        try:
            # The upload is checked (format, one frame, bytes and pixels from its header) before
            # it is stored for the worker; nothing else of it is decoded here.
            source = jobs.store_upload(image) if image else None
            options = options_from_form(prompt, negative, model, steps, guidance, seed, count, None, quality,
                                        aspect=aspect, strength=strength, source=source)
        except InvalidRequest as error:
            _discard_upload(jobs, source)  # stored, but the form was refused: no job will delete it
            yield f"**Cannot generate:** {error}", [], None
            return
        except RedisError as error:
            log.warning("queue unavailable: %s", error)
            yield QUEUE_DOWN, [], None
            return
        for text, items in run_job(jobs, options, client_of(request), finished):
            yield text, items, finished or None

    def act(action: str):
        def run(last, number, request: gr.Request):
            finished: dict = {}
            try:
                options = action_options(last, action, number)
            except InvalidRequest as error:
                yield f"**Cannot generate:** {error}", gr.update(), last
                return
            for text, items in run_job(jobs, options, client_of(request), finished):
                yield text, items, finished or last
        return run

    def picked(event: gr.SelectData):
        return (event.index or 0) + 1

    with gr.Blocks(title="Imagine", analytics_enabled=False) as ui:
        gr.Markdown("# Imagine\nText (or an image) to image on the same queue and GPU workers as the Discord bot.")
        last = gr.State(None)  # the latest result, for Vary and Upscale
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=settings.max_prompt_chars,
                                    placeholder="an orange cat staring off", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1,
                                      placeholder="empty: the server's default negative prompt")
                with gr.Row():
                    model = gr.Dropdown(label="Model", choices=list(catalog), value=model_now)
                    aspect = gr.Dropdown(label="Aspect ratio", elem_id="aspect", value=AUTO_ASPECT,
                                         choices=[("auto (1:1, or the image's)", AUTO_ASPECT)]
                                         + [(ratio, ratio) for ratio in ASPECT_RATIOS],
                                         info="width:height near the model's native pixel count")
                with gr.Row():
                    steps = gr.Slider(1, settings.max_steps, step=1, label="Steps",
                                      value=lambda: catalog[model_now()].default_steps)
                    guidance = gr.Slider(0, settings.max_guidance, step=0.5, label="Guidance",
                                         value=lambda: catalog[model_now()].default_guidance)
                with gr.Row():
                    seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, elem_id="seed")
                    count = gr.Slider(1, settings.max_count, step=1, value=1, label="Images")
                    quality = gr.Radio(["standard", "fast"], value="standard", label="Quality",
                                       info="fast: the model's fast configuration sets steps and guidance")
                with gr.Accordion("Start from an image (optional)", open=False):
                    # Raw bytes: the page checks the file itself; an image component would decode it.
                    image = gr.File(label="Image (PNG, JPEG, WebP)", file_types=["image"], type="binary",
                                    elem_id="image")
                    strength = gr.Slider(0.05, 1, step=0.05, value=DEFAULT_STRENGTH, label="Strength",
                                         info="how much to change the image (1 ignores it)")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(label="Images", columns=2, elem_id="results", format="png")
                with gr.Row():
                    number = gr.Number(label="Image # (click one in the gallery)", value=1, precision=0,
                                       minimum=1, elem_id="image-number")
                    subtle = gr.Button("Vary (Subtle)", elem_id="vary-subtle")
                    strong = gr.Button("Vary (Strong)", elem_id="vary-strong")
                    upscale = gr.Button("Upscale ×2", elem_id="upscale")
        model.change(defaults_for, model, [steps, guidance])
        inputs = [prompt, negative, model, steps, guidance, seed, count, aspect, quality, image, strength]
        outputs = [status, gallery, last]
        button.click(generate, inputs, outputs)
        prompt.submit(generate, inputs, outputs)
        gallery.select(picked, None, number)
        for control, action in ((subtle, "subtle"), (strong, "strong"), (upscale, "upscale")):
            control.click(act(action), [last, number], outputs)
    return ui


def main(argv: list[str] | None = None) -> int:
    no_options("python -m web.app", "Imagine's web UI (Gradio) on IMAGINE_WEB_HOST:IMAGINE_WEB_PORT.", argv)
    settings = load_settings()
    configure_logging("web", json_lines=settings.log_format == "json", level=settings.log_level,
                      secrets=secrets_of(settings))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup probes
    require_free_port(settings.web_host, settings.web_port, "IMAGINE_WEB_PORT")
    redis = connect(settings)
    ui = build_ui(WebJobs(redis, settings))
    add_demo_notice(ui, settings)
    # A handler holds its slot while it watches its job (mostly waiting on Redis): as many as
    # web jobs may be queued, and a bounded line of events behind them, never an unbounded one.
    watchers = settings.web_max_queued or 32
    ui.queue(default_concurrency_limit=watchers, max_size=watchers)
    log.info("web UI on http://%s:%d", settings.web_host, settings.web_port)
    ui.launch(**launch_options(settings))
    # Serving now. /healthz on its own port: 200 while Redis answers (core.health); SIGTERM
    # (docker stop) closes the server like Ctrl-C, exit code 0.
    serve_health(settings.metrics_host, settings.web_health_port, redis_ready(redis), what="web health",
                 setting="IMAGINE_WEB_HEALTH_PORT")
    stop_on_sigterm()
    ui.block_thread()  # until SIGTERM or Ctrl-C; closes the server
    log.info("web UI stopped")
    return 0


def launch_options(settings: Settings) -> dict:
    """Gradio's ``launch`` arguments. ``max_file_size``: Gradio itself refuses a larger upload
    (413) while receiving it; without it, anyone could stream any number of gigabytes to the
    server's disk, and the image input (raw bytes) would then read them all into memory."""
    return dict(server_name=settings.web_host, server_port=settings.web_port, ssr_mode=False, theme=THEME,
                footer_links=[], quiet=True, show_error=False, prevent_thread_lock=True,
                max_file_size=settings.source_max_bytes)


def add_demo_notice(ui: gr.Blocks, settings: Settings) -> None:
    """Below the page: say plainly when the default model is the tiny random-weight one."""
    entry = settings.catalog().get(settings.default_model)
    if entry is not None and random_weights(entry.source):
        with ui:
            gr.Markdown(f"**Demo model `{settings.default_model}`: {DEMO_NOTICE}.**", elem_id="demo-notice")


if __name__ == "__main__":
    sys.exit(main())
