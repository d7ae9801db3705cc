"""A finished job's result message: its files within Discord's limits, the embed and buttons,
posted in place of the user's queued/progress message (``worker.delivery``) and recorded as
told (``worker.outcomes``), so a rerun of the job never posts again."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pydantic import ValidationError
from redis.exceptions import RedisError

from core.jobs import JobRequest, JobResult, Reproducibility
from core.output_policy import notice
from core.policy_store import PolicyStore
from core.position_edits import PositionEdits
from core.texts import result_file_stem
from core.validation import UPSCALE_FACTOR
from settings.catalog import ModelEntry
from worker.delivery import ResultComponents, Upload, deliver_result, result_embed
from worker.generate import Generation
from worker.images import encode_for_upload, grid
from worker.outcomes import Told
from worker.progress import ProgressReporter

if TYPE_CHECKING:
    from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

TOLD_PATIENCE_S = 30.0  # how long a result's told record is retried while Redis refuses writes

# Discord caps a whole message's attachments at 25 MiB, whatever each file's own limit is.
REQUEST_UPLOAD_LIMIT = 25 * 1024 * 1024
MAX_ATTACHMENTS = 10
SPOILER_PREFIX = "SPOILER_"  # Discord shows such a file blurred until clicked


def uploads_for(generation: Generation, record: Reproducibility, limit: int) -> list[Upload]:
    """One file per image the output check lets out, with its generation record; with several,
    a grid of them too. Withheld images are not encoded at all; spoilered ones (and a grid
    holding any) get Discord's ``SPOILER_`` name. Each file gets an equal share of the
    per-message limit when the per-file limit would overrun it."""
    shown = [(image, seed, action) for image, seed, action
             in zip(generation.images, generation.seeds, generation.actions) if action != "withhold"]
    if not shown:
        return []
    with_grid = 1 < len(shown) < MAX_ATTACHMENTS  # Discord: 10 files per message
    files = len(shown) + with_grid
    limit = min(limit, REQUEST_UPLOAD_LIMIT // files)
    uploads = []
    for image, seed, action in shown:
        data, ext = encode_for_upload(image, limit, record.png_text(seed))
        prefix = SPOILER_PREFIX if action == "spoiler" else ""
        uploads.append(Upload(data, f"{prefix}{result_file_stem(record.model, seed)}.{ext}"))
    if with_grid:
        data, ext = encode_for_upload(grid([image for image, _, _ in shown]), limit)
        prefix = SPOILER_PREFIX if any(action == "spoiler" for _, _, action in shown) else ""
        uploads.append(Upload(data, f"{prefix}imagine-{record.model}-grid.{ext}"))
    return uploads


def embed_image(uploads: list[Upload]) -> str | None:
    """The file the embed shows (the image, or the grid of several). Never a spoiler: Discord
    does not blur an embed's image, so a spoilered file is shown only as its blurred attachment."""
    if not uploads or uploads[-1].filename.startswith(SPOILER_PREFIX):
        return None
    return uploads[-1].filename


def models_offered(runtime: WorkerRuntime, guild_id: int | None) -> dict[str, ModelEntry]:
    """The catalog as the server's policy allows it now: the model select offers no model whose
    pick the policy would refuse. Unreadable policy: the whole catalog (a pick is checked again)."""
    try:
        allowed = PolicyStore(runtime.redis, runtime.key_prefix).load(guild_id).allowed_models
    except (RedisError, ValidationError) as error:
        log.warning("could not read the server's allowed models: %s", error)
        allowed = ()
    return {key: entry for key, entry in runtime.catalog.items() if not allowed or key in allowed}


def told_meanwhile(runtime: WorkerRuntime, job_id: str) -> Told | None:
    """What the user was told about this job by another process since it started, if anything
    (None too when Redis cannot say: the images go out)."""
    try:
        return runtime.outcomes.get(job_id)
    except RedisError:
        return None


def post_result(runtime: WorkerRuntime, request: JobRequest, generation: Generation, result: JobResult,
                progress: ProgressReporter | None) -> None:
    """Replace the user's queued/progress message with the images, embed and buttons."""
    assert request.delivery is not None and result.reproducibility is not None
    post_started = time.perf_counter()
    uploads = uploads_for(generation, result.reproducibility, request.delivery.filesize_limit)
    result.timings.total_ms = (time.time() - request.created_at) * 1000
    embed = result_embed(request, generation.seeds, result.timings, result.reproducibility,
                         embed_image(uploads), withheld=generation.withheld)
    if progress is not None:
        progress.close()  # no progress edit may land after the result
    try:
        PositionEdits(runtime.redis, runtime.key_prefix).finalize(request.job_id)
    except RedisError as error:  # Redis full or away: the images matter more than edit ordering
        log.warning("job %s: could not finalize position edits: %s", request.job_id, error)
    settings = runtime.settings
    upscale = (request.width * request.height * UPSCALE_FACTOR**2 <= settings.max_upscale_pixels
               and max(request.width, request.height) <= settings.max_size)
    shown = [i for i, action in enumerate(generation.actions) if action != "withhold"]
    view = ResultComponents(request.job_id, request.model, models_offered(runtime, request.delivery.guild_id),
                            images=shown, upscale=upscale)
    flags = None if any(v.flagged is None for v in generation.moderation or ()) else \
        [bool(v.flagged) for v in generation.moderation or ()]
    told = notice(generation.actions, flags)
    content = f"<@{request.delivery.user_id}>" + (f"\n{told}" if told else "")
    if (earlier := told_meanwhile(runtime, request.job_id)) is not None:
        # Another worker took this one for dead (its lease lapsed while Redis was out of reach)
        # and told the user: one story per command, so these images stay here.
        log.warning("job %s: the user was told (%s) while it ran; result not posted", request.job_id, earlier.kind)
        return
    posted = deliver_result(request.delivery, content, embed, uploads, view,
                            runtime.session, runtime.bot_token, nonce=request.job_id[:25])
    # Retried while Redis refuses it, then kept in this process: a rerun never posts again.
    runtime.outcomes.record(request.job_id, Told("result", posted.message_id, posted.via),
                            patience_s=TOLD_PATIENCE_S)
    result.message_id, result.delivered_via = posted.message_id, posted.via
    result.timings.post_ms = (time.perf_counter() - post_started) * 1000
