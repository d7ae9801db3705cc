"""Images as they are uploaded: PNG with its record, re-encoded under the size limit, the
grid, and what fits one Discord message."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from worker.images import encode_for_upload, grid


def checked(generation):
    """As the output classifier leaves a generation with nothing flagged."""
    import dataclasses

    from core.jobs import ImageModeration

    verdicts = tuple(ImageModeration(score=-1.0, flagged=False, action="show") for _ in generation.images)
    return dataclasses.replace(generation, moderation=verdicts)


def noisy_image(size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_small_image_stays_lossless_png_with_its_record():
    data, ext = encode_for_upload(noisy_image(32), 10 * 1024 * 1024, {"seed": "5"})
    image = Image.open(io.BytesIO(data))
    assert ext == "png" and image.text["seed"] == "5"
    assert np.array_equal(np.asarray(image), np.asarray(noisy_image(32)))


def test_image_over_the_limit_is_reencoded_not_dropped():
    image = noisy_image(512)  # noise: ~790 KB as PNG
    limit = 200 * 1024
    data, ext = encode_for_upload(image, limit)
    assert ext == "jpg" and len(data) <= limit
    assert Image.open(io.BytesIO(data)).size[0] >= 256


def test_uploads_of_one_message_stay_under_discords_request_limit(monkeypatch):
    """Four large images and their grid must fit one message (25 MiB), not only each file."""
    from core.jobs import Reproducibility
    from worker import results
    from worker.generate import Generation

    monkeypatch.setattr(results, "REQUEST_UPLOAD_LIMIT", 1024 * 1024)  # scaled down: 1 MiB per message
    images = [noisy_image(512) for _ in range(4)]  # ~790 KB each as PNG
    record = Reproducibility(model="m", source="s", pipeline="P", scheduler="S", diffusers_version="0",
                             seeds=[1, 2, 3, 4], steps=1, guidance=1, width=512, height=512, prompt="p")
    uploads = results.uploads_for(checked(Generation(images, [1, 2, 3, 4], 1.0, 0.0)), record, 10 * 1024 * 1024)
    assert len(uploads) == 5  # four images and the grid
    assert sum(len(u.data) for u in uploads) <= 1024 * 1024


def test_ten_images_fit_discords_ten_attachments():
    """The grid is left out when it would be an 11th file (Discord refuses the message)."""
    from core.jobs import Reproducibility
    from worker import results
    from worker.generate import Generation

    images = [Image.new("RGB", (64, 64), (i * 20, 0, 0)) for i in range(10)]
    seeds = list(range(10))
    record = Reproducibility(model="m", source="s", pipeline="P", scheduler="S", diffusers_version="0",
                             seeds=seeds, steps=1, guidance=1, width=64, height=64, prompt="p")
    assert len(results.uploads_for(checked(Generation(images, seeds, 1.0, 0.0)), record, 1 << 20)) == 10
    assert len(results.uploads_for(checked(Generation(images[:9], seeds[:9], 1.0, 0.0)), record, 1 << 20)) == 10


def test_grid_places_images_in_a_square():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    sheet = np.asarray(grid([Image.new("RGB", (4, 4), c) for c in colours]))
    assert sheet.shape == (8, 8, 3)
    assert [tuple(sheet[1, 1]), tuple(sheet[1, 5]), tuple(sheet[5, 1]), tuple(sheet[5, 5])] == \
        [*colours, (255, 255, 255)]
