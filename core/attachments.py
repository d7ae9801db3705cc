"""Source images from users, checked the same way wherever they arrive (pure; Pillow imported
only by :func:`inspect_image`, which the bot never calls: it never holds image bytes).

  allowed_hosts / is_attachment_url   which URLs are Discord attachments of the configured API
                                      (the worker fetches nothing else: no arbitrary URLs)
  check_attachment                    what Discord claims about an attachment (content type,
                                      size, width/height, URL), before anything is queued
  inspect_image                       the bytes themselves (web uploads, worker downloads):
                                      the real format, animation, pixels read from the header
                                      before any decode

Each failure is one :class:`InvalidRequest` line, shown to the user as is.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from core.texts import clip
from core.validation import InvalidRequest

# Where Discord serves attachments (the API itself is on discord.com).
DISCORD_CDN_HOSTS = ("cdn.discordapp.com", "media.discordapp.net")
DISCORD_API_HOSTS = ("discord.com", "discordapp.com", "canary.discord.com", "ptb.discord.com")
ATTACHMENT_PATHS = ("/attachments/", "/ephemeral-attachments/")
# MIME type → Pillow format name. Animated GIF/WebP/PNG (APNG) are refused after reading them.
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
               "image/gif": "GIF"}
TYPE_NAMES = "PNG, JPEG, WebP or GIF"
# The only Pillow plugins ever run on a user's bytes: no other plugin's header parser sees them
# (EPS would later call Ghostscript; TIFF, PSD, ICO … have had their own parser bugs).
PILLOW_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # shown turned by 90° (as ImageOps.exif_transpose does)
# Other formats named in the refusal, by their magic bytes alone (never opened).
OTHER_FORMATS = ((b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%!PS", "EPS"),
                 (b"\xc5\xd0\xd3\xc6", "EPS"), (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"), (b"%PDF", "PDF"))


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.2f} MP"


def allowed_hosts(api_base: str, configured: Iterable[str] = ()) -> frozenset[str]:
    """The hosts (``host`` or ``host:port``, lower case) attachments may come from: the operator's
    list when set, else Discord's CDN for Discord's API, else the API's own host (a local
    Discord-compatible server serves its attachments itself)."""
    hosts = frozenset(h.strip().lower() for h in configured if h and h.strip())
    if hosts:
        return hosts
    api = urlsplit(api_base)
    if (api.hostname or "").lower() in DISCORD_API_HOSTS:
        return frozenset(DISCORD_CDN_HOSTS)
    return frozenset({api.netloc.lower()})


def is_attachment_url(url: str | None, api_base: str, configured: Iterable[str] = ()) -> bool:
    """Whether ``url`` is a Discord attachment on an allowed host: https (plain http only when the
    configured API itself is plain http, i.e. a local test server), no credentials, an
    ``/attachments/…`` path."""
    if not url or len(url) > 2048:
        return False
    # Only what Discord itself sends: printable ASCII. Python's urlsplit silently drops tabs and
    # newlines, and parsers disagree on backslashes and Unicode hosts: what is checked here must
    # be exactly what the HTTP client will connect to.
    if not url.isascii() or any(ch <= " " or ch in "\\\x7f" for ch in url):
        return False
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        return False
    schemes = {"https"} | ({"http"} if urlsplit(api_base).scheme == "http" else set())
    return (parts.scheme in schemes and port_ok and parts.username is None and parts.password is None
            and parts.netloc.lower() in allowed_hosts(api_base, configured)
            and parts.path.startswith(ATTACHMENT_PATHS))


def check_attachment(*, filename: str, content_type: str | None, size: int, width: int | None,
                     height: int | None, url: str | None, max_bytes: int, max_pixels: int,
                     api_base: str, hosts: Iterable[str] = (), option: str = "image") -> tuple[int, int]:
    """What Discord says about an attachment, checked before anything is queued; its (width,
    height). ``max_bytes``: the smaller of the upload limit and the operator's download limit.
    Nothing here is trusted later: the worker checks the bytes again (:func:`inspect_image`)."""
    name = clip(filename or "the file", 80)
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind not in IMAGE_TYPES:
        raise InvalidRequest(f"`{option}` must be a {TYPE_NAMES} image (`{name}` is "
                             f"{clip(kind, 60) or 'of unknown type'}).")
    if size > max_bytes:
        raise InvalidRequest(f"`{option}` is {_mib(size)}; the limit is {_mib(max_bytes)}.")
    if not width or not height:  # Discord sets them only for files it could read as images
        raise InvalidRequest(f"`{option}`: `{name}` is not a readable image (Discord found no size in it).")
    if width * height > max_pixels:
        raise InvalidRequest(f"`{option}` is {width}×{height} ({_megapixels(width * height)}); "
                             f"the limit is {_megapixels(max_pixels)}.")
    if not is_attachment_url(url, api_base, hosts):
        raise InvalidRequest(f"`{option}` must be a file attached to this command (its link is not "
                             f"on Discord's CDN).")
    return width, height


@dataclass(frozen=True)
class ImageFacts:
    width: int
    height: int
    format: str  # Pillow's name: PNG, JPEG, WEBP, GIF
    content_type: str


def _exif_orientation(image) -> int | None:
    """The EXIF Orientation tag, from the header only: None when absent or unreadable, or when
    the EXIF block is not in the header (Pillow's ``getexif`` would decode the whole image to
    find a PNG's later eXIf chunk, and nothing is decoded here)."""
    if "exif" not in image.info:
        return None
    try:
        return image.getexif().get(EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the worker's decode is the judge
        return None


def inspect_image(data: bytes, *, max_bytes: int, max_pixels: int, claimed_type: str | None = None,
                  option: str = "image") -> ImageFacts:
    """The real facts of an untrusted image, from its header (no pixel is decoded here): a
    supported format, the type it claims (when it claims one), a single frame, within the byte
    and pixel limits. Raises InvalidRequest."""
    from PIL import (  # web and worker have Pillow; the bot never calls this
        Image,
        UnidentifiedImageError,
    )

    if len(data) > max_bytes:
        raise InvalidRequest(f"`{option}` is {_mib(len(data))}; the limit is {_mib(max_bytes)}.")
    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:  # reads the header only
            fmt, (width, height) = image.format or "", image.size
            frames = getattr(image, "n_frames", 1)
            if _exif_orientation(image) in TRANSPOSING_ORIENTATIONS:  # a phone's portrait photo:
                width, height = height, width  # its size as the user sees it (the worker rotates)
    except Image.DecompressionBombError:  # Pillow's own guard, far above ours: it is an image
        raise InvalidRequest(f"`{option}` has far too many pixels; the limit is {_megapixels(max_pixels)}.") from None
    except (UnidentifiedImageError, OSError, ValueError):
        other = next((name for magic, name in OTHER_FORMATS if data.startswith(magic)), None)
        if other is not None:
            raise InvalidRequest(f"`{option}` must be a {TYPE_NAMES} image (it is {other}).") from None
        raise InvalidRequest(f"`{option}` is not a {TYPE_NAMES} image.") from None
    if fmt == "MPO":  # a JPEG followed by more images (a phone's HDR gain map, a stereo pair):
        fmt, frames = "JPEG", 1  # the first is the photo, and the only one ever decoded
    kinds = {mime for mime, name in IMAGE_TYPES.items() if name == fmt}
    if not kinds:
        raise InvalidRequest(f"`{option}` must be a {TYPE_NAMES} image (it is {clip(fmt, 20) or 'unknown'}).")
    claimed = (claimed_type or "").split(";")[0].strip().lower()
    if claimed and claimed not in kinds:
        raise InvalidRequest(f"`{option}` claims to be {clip(claimed, 60)} but is a {fmt} image.")
    if frames > 1:
        raise InvalidRequest(f"`{option}` is animated ({frames} frames); use a still image.")
    if width * height > max_pixels:
        raise InvalidRequest(f"`{option}` is {width}×{height} ({_megapixels(width * height)}); "
                             f"the limit is {_megapixels(max_pixels)}.")
    return ImageFacts(width, height, fmt, sorted(kinds)[0] if fmt != "JPEG" else "image/jpeg")
