"""Live progress in the user's own message: a step bar while generating, the queue position
and ETA while waiting, optionally a tiny preview decoded from the latents.

Every edit goes to the interaction's original response (``PATCH …/messages/@original``). Edits
are throttled per message — at most one per ``progress_interval_s`` — by a local clock in the
reporter and by a Redis gate shared with the queue refresher, which runs in other workers too.
The denoising loop never waits on Discord: it only hands the latest step to a sender thread.

The last part wires this to a running job: its reporter, its RQ meta for the web front end, and
the refresh of the messages queued behind it.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable

import requests
import torch
from PIL import Image
from redis import Redis
from rq import Queue, Worker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from core.fleet import FleetStats, work_units
from core.jobs import NOTES_META, PROGRESS_META, JobRequest, queue_name
from core.position_edits import PositionEdits
from core.texts import generating_text, queued_text
from core.tokens import with_token
from worker.delivery import Upload, edit_original

if TYPE_CHECKING:  # annotations only: the runtime module imports this one
    from worker.generate import StepCallback
    from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

# Latent → RGB linear projections (4 latent channels × RGB), the community-measured factors
# used for cheap previews of SD 1.x/2.x and SDXL latents: no VAE decode, no extra model.
SD_FACTORS = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
              (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))
SD_BIAS = (0.0, 0.0, 0.0)
SDXL_FACTORS = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188))
SDXL_BIAS = (0.1084, -0.0175, -0.0011)
PREVIEW_PX = 128
PREVIEW_NAME = "preview.png"
SPOILER_PREVIEW_NAME = "SPOILER_preview.png"


def preview_name(request: JobRequest) -> str | None:
    """How a job's latent preview may go out, if at all. The final image cannot be checked
    before it exists and late previews resemble it: none where the server withholds flagged
    images, a spoiler where it spoilers them (or the user asked for spoilers)."""
    if request.nsfw_action == "block":
        return None
    return SPOILER_PREVIEW_NAME if request.nsfw_action == "spoiler" or request.spoiler else PREVIEW_NAME


def latent_preview(latents: torch.Tensor, xl: bool, size: int = PREVIEW_PX) -> bytes:
    """PNG of the first image's latents (channels, h, w or batch first) projected to RGB."""
    first = latents[0] if latents.dim() == 4 else latents
    factors, bias = (SDXL_FACTORS, SDXL_BIAS) if xl else (SD_FACTORS, SD_BIAS)
    rgb = torch.einsum("chw,cr->hwr", first.detach().float().cpu(), torch.tensor(factors))
    rgb = ((rgb + torch.tensor(bias) + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)
    image = Image.fromarray(rgb.numpy()).resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class EditGate:
    """At most one edit per message per interval across processes (Redis ``SET NX PX``)."""

    def __init__(self, redis: Redis, prefix: str, interval_s: float):
        self.redis = redis
        self.prefix = prefix
        # A little under the interval, so the reporter's own clock, not clock skew, decides.
        self.ttl_ms = max(1, int(interval_s * 900))

    def acquire(self, job_id: str) -> bool:
        return bool(self.redis.set(f"{self.prefix}:edit-gate:{job_id}", 1, nx=True, px=self.ttl_ms))


Send = Callable[[int, int, bytes | None], None]  # (step, total, preview PNG or None)


class ProgressReporter:
    """Takes step callbacks from the denoising loop; a daemon thread sends the latest one at
    most once per ``interval_s``. ``close()`` waits for an edit in flight, so no progress edit
    can land after the final result; ``stop()`` first lets the caller overlap that wait with
    other work."""

    def __init__(self, send: Send, interval_s: float, gate: Callable[[], bool] = lambda: True,
                 preview: Callable[[torch.Tensor], bytes] | None = None):
        self.send = send
        self.interval_s = interval_s
        self.gate = gate
        self.preview = preview
        self._pending: tuple[int, int, torch.Tensor | None] | None = None
        self._last_sent = float("-inf")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def _due(self) -> bool:
        return time.monotonic() - self._last_sent >= self.interval_s

    def on_step(self, step: int, total: int, latents: torch.Tensor | None) -> None:
        # Copy latents off the device only when an edit is due: the copy syncs the GPU.
        due = latents is not None and self.preview is not None and self._due()
        keep = latents[:1].to("cpu", copy=True) if due else None
        with self._lock:
            if keep is None and self._pending is not None and self._pending[2] is not None:
                keep = self._pending[2]  # keep a due preview until it is sent
            self._pending = (step, total, keep)
        self._wake.set()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait()
            self._wake.clear()
            wait = self._last_sent + self.interval_s - time.monotonic()
            if wait > 0 and self._closed.wait(wait):
                return
            with self._lock:
                pending, self._pending = self._pending, None
            if pending is None or self._closed.is_set() or not self.gate():
                continue
            step, total, latents = pending
            png = self._preview_of(latents)
            try:
                self.send(step, total, png)
            except Exception as error:  # progress is a nicety: never fail the job for it
                log.warning("progress edit failed: %s", error)
            self._last_sent = time.monotonic()

    def _preview_of(self, latents: torch.Tensor | None) -> bytes | None:
        """The preview PNG, or None: a decoder that fails (out of memory, a broken tiny VAE)
        costs the picture, never the step bar."""
        if latents is None or self.preview is None:
            return None
        try:
            return self.preview(latents)
        except Exception as error:
            log.warning("progress preview failed: %s", error)
            return None

    def stop(self) -> None:
        """No more edits start; one in flight may still finish (see :meth:`close`)."""
        self._closed.set()
        self._wake.set()

    def close(self, timeout: float = 10) -> None:
        """Stop and wait for an edit in flight, so nothing lands after the final result."""
        self.stop()
        self._thread.join(timeout)


def refresh_queued_messages(redis: Redis, queue: Queue, stats: FleetStats, gate: EditGate,
                            session: requests.Session, limit: int) -> int:
    """Edit the waiting jobs' messages with their new position and ETA (the first ``limit``
    of the queue); returns how many were edited. Called when a worker takes a job."""
    ids = queue.get_job_ids(0, limit)
    workers = Worker.count(connection=redis, queue=queue)
    ordering = PositionEdits(redis, gate.prefix)
    edited = 0
    for position, job in enumerate(Job.fetch_many(ids, connection=redis, serializer=JSONSerializer), 1):
        if job is None:
            continue
        request = JobRequest.model_validate(job.args[0])
        if request.delivery is None or not gate.acquire(request.job_id):
            continue
        if job.get_status() != JobStatus.QUEUED:  # taken meanwhile: its own progress follows
            continue
        eta = stats.eta(request.model, position, workers, work_units(request))
        with ordering.position_edit(request.job_id) as allowed:
            if not allowed:
                continue
            try:
                edit_original(with_token(redis, gate.prefix, request).delivery, session,
                              queued_text(request.model, request.prompt, request.count, position, eta,
                                          notes=notes_of(job)))
                edited += 1
            except Exception as error:
                log.warning("queue position edit for %s failed: %s", request.job_id, error)
    return edited


# -- wiring for a running job ---------------------------------------------------------------------
def discord_progress(runtime: WorkerRuntime, request: JobRequest) -> ProgressReporter | None:
    """Step bar (and optional preview) edited into the user's message, rate-limited."""
    if request.delivery is None:
        return None
    request = with_token(runtime.redis, runtime.key_prefix, request)  # a batch companion's too
    delivery, gate = request.delivery, runtime.gate()
    name = preview_name(request)

    def send(step: int, total: int, preview: bytes | None) -> None:
        text = generating_text(request.model, request.prompt, request.count, step, total)
        edit_original(delivery, runtime.session, text,
                      None if preview is None or name is None else [Upload(preview, name)])

    preview = preview_function(runtime, request.model) \
        if runtime.settings.progress_preview and name is not None else None
    return ProgressReporter(send, runtime.settings.progress_interval_s,
                            gate=lambda: gate.acquire(request.job_id), preview=preview)


def preview_function(runtime: WorkerRuntime, model: str) -> Callable[[torch.Tensor], bytes]:
    """Latents → preview PNG: the model's tiny autoencoder when the settings ask for it and it is
    loaded (worker.pipelines logged once at start when not), else the linear projection."""
    tiny_vae = runtime.pipelines.tiny_vaes.get(model) \
        if runtime.settings.progress_preview_decoder == "tiny-vae" else None
    if tiny_vae is not None:
        from worker.fast_decode import preview_png

        return lambda latents: preview_png(tiny_vae, latents, PREVIEW_PX)
    xl = "XL" in runtime.pipelines.entries[model].pipeline
    return lambda latents: latent_preview(latents, xl)


def notes_of(job: Job) -> list[str]:
    """The notes the user got when the job was queued (core.queue), kept by position edits."""
    notes = job.meta.get(NOTES_META)
    return [note for note in notes if isinstance(note, str)] if isinstance(notes, list) else []


def meta_progress(job: Job | None) -> StepCallback | None:
    """Keep the job's progress in its RQ meta, where the web front end reads it."""
    if job is None:
        return None

    def report(step: int, steps: int, latents) -> None:
        job.meta[PROGRESS_META] = {"step": step, "steps": steps}
        job.save_meta()
    return report


def refresh_queue_later(runtime: WorkerRuntime, model: str) -> None:
    """The jobs behind this one moved up: update their messages, off the job's thread."""
    queue = Queue(queue_name(model, runtime.key_prefix), connection=runtime.redis, serializer=JSONSerializer)
    future = runtime.background.submit(refresh_queued_messages, runtime.redis, queue, runtime.stats(),
                                       runtime.gate(), runtime.session, runtime.settings.queue_refresh_jobs)
    future.add_done_callback(_log_refresh_failure)


def _log_refresh_failure(future: Future) -> None:
    if future.exception() is not None:  # a nicety: never fail a job for it, but say so
        log.warning("queue position refresh failed: %s", future.exception())
