"""A job's source image, safely: fetched by the worker itself, checked before any pixel is
decoded, normalised to RGB as the user sees it, and fitted to the job's width and height.

  fetch_bytes    a Discord attachment URL (only on the attachment hosts of the configured API:
                 core.attachments; the request is never made otherwise), over https for Discord's
                 own hosts, with a timeout, no redirects, and a byte limit enforced while
                 streaming; or a web result PNG from Redis, only under ``{prefix}:images:``
  decode         the real format (PNG, JPEG, WebP, GIF), a single frame, the type it claims,
                 width × height from the header under the pixel limit before ``load()``
                 (decompression bombs are never decoded), EXIF orientation applied, CMYK /
                 palette / alpha / 16-bit converted to RGB (alpha on white)
  fit            centre-cropped to the job's aspect ratio and resized to its width × height

Every refusal is a :class:`core.jobs.InputImageError` with one line for the user: the job fails
at once, without retries, and the user is told once (worker.failures).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps

from core.attachments import (
    PILLOW_FORMATS,
    allowed_hosts,
    inspect_image,
    is_attachment_url,
)
from core.jobs import InputImageError, SourceImage
from core.validation import InvalidRequest
from settings.config import Settings

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
EXPIRED_STATUSES = (401, 403, 404, 410)  # Discord's CDN: a signed URL past its expiry, or deleted
DEADLINE_GRACE = 1.5  # the whole download may take this × source_timeout_s (the body alone: 1 ×)
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class SourceInput:
    """A source image ready for the pipeline, with the hash of the file it came from."""

    image: Image.Image  # RGB, the job's width × height
    sha256: str
    original_size: tuple[int, int]  # as the user sees it (after EXIF rotation)


def _refuse(text: str) -> InputImageError:
    return InputImageError(" ".join(text.split()))  # always one line


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _read_some(response: requests.Response) -> bytes:
    """Up to CHUNK bytes, as soon as any arrive (urllib3's ``read1``), so the download's overall
    deadline is checked while a slow server trickles; content encodings are decoded."""
    raw = response.raw
    read1 = getattr(raw, "read1", None)
    return read1(CHUNK, decode_content=True) if read1 is not None else raw.read(CHUNK, decode_content=True)


def download(url: str, settings: Settings, session: requests.Session | None = None) -> bytes:
    """The attachment's bytes; refused without any request when ``url`` is not a Discord
    attachment on an allowed host."""
    if not is_attachment_url(url, settings.discord_api_base, settings.attachment_hosts):
        host = urlsplit(url).netloc if isinstance(url, str) else "?"
        log.warning("refused to fetch a source image from %r (allowed: %s)", host[:100],
                    sorted(allowed_hosts(settings.discord_api_base, settings.attachment_hosts)))
        raise _refuse("The image link is not a Discord attachment, so it was not fetched.")
    try:
        # The whole download, headers included, within the deadline: requests' own timeout bounds
        # each wait for bytes, so a server trickling its headers would otherwise hold the worker.
        return _within(settings.source_timeout_s * DEADLINE_GRACE, lambda: _fetch(url, settings, session))
    except requests.Timeout:
        raise _refuse(f"The image took longer than {settings.source_timeout_s:g} s to download.") from None
    except requests.RequestException as error:
        log.warning("source image download failed: %s", type(error).__name__)
        raise _refuse("The image could not be downloaded; attach it again.") from None


def _fetch(url: str, settings: Settings, session: requests.Session | None) -> bytes:
    limit = settings.source_max_bytes
    get = (session or requests).get
    # requests' timeout bounds each wait for bytes; this bounds the body (a server dripping a
    # byte at a time cannot hold the worker).
    deadline = time.monotonic() + settings.source_timeout_s
    with get(url, stream=True, timeout=settings.source_timeout_s, allow_redirects=False) as response:
        if response.status_code in EXPIRED_STATUSES:
            raise _refuse("The image's link has expired or the file was deleted; attach it again.")
        if response.status_code != 200:
            raise _refuse(f"The image could not be downloaded (Discord answered {response.status_code}).")
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _refuse(f"The image is {_mib(int(declared))}; the limit is {_mib(limit)}.")
        data = bytearray()
        while chunk := _read_some(response):
            data += chunk
            if len(data) > limit:
                raise _refuse(f"The image is over the limit of {_mib(limit)}.")
            if time.monotonic() > deadline:
                raise requests.Timeout()
        return bytes(data)


def _within(seconds: float, work: Callable[[], bytes]) -> bytes:
    """``work()`` in a daemon thread, waited for at most ``seconds`` (then requests.Timeout). A
    thread still stuck in a read is left behind; requests' per-read timeout or the server's
    close ends it."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # handed to the caller as is
            outcome["error"] = error

    thread = threading.Thread(target=run, name="source-download", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise requests.Timeout()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def stored_image(redis, key: str, prefix: str) -> bytes:
    """A web result's PNG, read only from this deployment's image namespace."""
    if not re.fullmatch(rf"{re.escape(prefix)}:images:[A-Za-z0-9_-]{{1,80}}:[0-9]{{1,2}}", key or ""):
        raise _refuse("That image is not one of this service's results.")
    data = redis.get(key)
    if data is None:
        raise _refuse("That image is no longer stored (results expire); generate it again.")
    return bytes(data)


def fetch_bytes(source: SourceImage, settings: Settings, redis, session: requests.Session | None = None) -> bytes:
    if source.url is not None:
        return download(source.url, settings, session)
    return stored_image(redis, source.image_key or "", settings.queue_prefix)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the user sees it: 16-bit greyscale scaled (not clipped), alpha on white,
    palettes and CMYK converted."""
    if image.mode in SIXTEEN_BIT:
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def decode(data: bytes, settings: Settings, claimed_type: str | None = None) -> tuple[Image.Image, str]:
    """(RGB image as the user sees it, sha256 of ``data``). The header is checked first
    (core.attachments.inspect_image): nothing over the pixel limit is ever decoded."""
    try:  # Pillow's own bomb guard fires on open (header only) far above our limit: say so
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS):
            pass
    except Image.DecompressionBombError:
        raise _refuse(f"The image has far too many pixels; the limit is "
                      f"{settings.source_max_pixels / 1e6:.0f} megapixels.") from None
    except Exception:  # noqa: BLE001 - not an image at all: inspect_image says so below
        pass
    try:
        inspect_image(data, max_bytes=settings.source_max_bytes, max_pixels=settings.source_max_pixels,
                      claimed_type=claimed_type)
    except InvalidRequest as error:
        raise _refuse(str(error)) from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as opened:
                width, height = opened.size
                if width * height > settings.source_max_pixels:  # checked again: never load() a bomb
                    raise _refuse(f"The image is {width}×{height}; the limit is "
                                  f"{settings.source_max_pixels / 1e6:.0f} megapixels.")
                opened.load()
                image = ImageOps.exif_transpose(opened) or opened
                image = _to_rgb(image)
                image.load()
    except InputImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError) as error:
        log.info("source image did not decode: %s", type(error).__name__)
        raise _refuse("The image file is damaged or incomplete and could not be read.") from None
    return image, digest


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-cropped to ``width``:``height`` and resized to exactly that (Lanczos)."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def load_source(source: SourceImage, width: int, height: int, settings: Settings, redis,
                session: requests.Session | None = None) -> SourceInput:
    """The job's source image, downloaded, checked, normalised and fitted to its size."""
    data = fetch_bytes(source, settings, redis, session)
    claimed = source.content_type if source.url is not None else None
    image, digest = decode(data, settings, claimed)
    return SourceInput(fit(image, width, height), digest, image.size)


def from_file(path, width: int | None, height: int | None, settings: Settings) -> SourceInput:
    """A local file (the CLI): the same checks as a download; no resize when no size is given."""
    with open(path, "rb") as handle:
        data = handle.read(settings.source_max_bytes + 1)
    if len(data) > settings.source_max_bytes:
        raise _refuse(f"The image is over the limit of {_mib(settings.source_max_bytes)}.")
    image, digest = decode(data, settings)
    fitted = image if width is None or height is None else fit(image, width, height)
    return SourceInput(fitted, digest, image.size)
