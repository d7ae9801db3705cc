"""A web job's images: PNGs (with their generation record) in Redis under ``core.jobs.image_key``,
where the web front end reads them, expiring with the job's result. Output moderation decides
first: a withheld image is never stored (its key is ""), a spoilered one only blurred (the
web page has no click-to-reveal)."""

from __future__ import annotations

from PIL import Image, ImageFilter
from rq.job import Job

from core.jobs import JobRequest, image_key
from worker.generate import Generation
from worker.images import png_bytes

DEFAULT_TTL_S = 3600  # when the job names no positive result TTL (RQ: None, 0 or -1)
BLUR_FRACTION = 0.06  # Gaussian radius as a share of the image side: shapes, no detail


def blurred(image: Image.Image) -> Image.Image:
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(max(2.0, BLUR_FRACTION * max(image.size))))


def store_images(job: Job | None, request: JobRequest, generation: Generation, prefix: str) -> list[str]:
    """One key per image in order: the stored PNG's, or "" for a withheld image."""
    if job is None:
        raise RuntimeError("store_images needs the RQ job's Redis connection")
    ttl = job.result_ttl if job.result_ttl and job.result_ttl > 0 else DEFAULT_TTL_S
    keys = []
    with job.connection.pipeline() as pipe:
        for index, (image, seed, action) in enumerate(zip(generation.images, generation.seeds,
                                                          generation.actions)):
            if action == "withhold":
                keys.append("")
                continue
            if action == "spoiler":
                image = blurred(image)
            key = image_key(request.job_id, index, prefix)
            text = {"prompt": request.prompt, "model": request.model, "seed": str(seed),
                    "width": str(request.width), "height": str(request.height), "mode": request.mode}
            if request.strength is not None:  # image input: how, and from which file (its sha256)
                text.update(strength=f"{request.strength:g}", source_sha256=generation.source_sha256 or "")
            pipe.set(key, png_bytes(image, text), ex=ttl)
            keys.append(key)
        pipe.execute()
    return keys
