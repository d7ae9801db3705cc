"""Encode generated images for upload: PNG with its generation record, re-encoded (never
dropped, the record kept as a JPEG comment) when it would exceed the interaction's file-size
limit."""

from __future__ import annotations

import io
import json
import math

from PIL import Image, PngImagePlugin

JPEG_QUALITIES = (92, 85, 75, 60)
MAX_JPEG_COMMENT = 65_000  # one COM segment holds 65,533 bytes (prompts are far shorter)


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, quality: int, text: dict[str, str] | None = None) -> bytes:
    """JPEG at ``quality``; ``text`` (the PNG's record) as a JSON comment, so a file re-encoded to
    fit the upload limit still says how it was made."""
    extra = {"comment": json.dumps(text, ensure_ascii=False).encode()[:MAX_JPEG_COMMENT]} if text else {}
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True, **extra)
    return buffer.getvalue()


def encode_for_upload(
    image: Image.Image, limit: int, text: dict[str, str] | None = None
) -> tuple[bytes, str]:
    """(data, extension): lossless PNG when it fits, else JPEG at falling quality, else halved
    resolution until it fits."""
    data = png_bytes(image, text)
    if len(data) <= limit:
        return data, "png"
    while True:
        for quality in JPEG_QUALITIES:
            data = jpeg_bytes(image, quality, text)
            if len(data) <= limit:
                return data, "jpg"
        if min(image.size) <= 16:
            return data, "jpg"  # cannot shrink further; let Discord answer
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)


def grid(images: list[Image.Image]) -> Image.Image:
    """All images on one sheet, as square as possible (2 → 2×1, 3–4 → 2×2)."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet
