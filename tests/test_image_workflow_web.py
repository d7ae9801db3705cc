"""Issue 14 on the web page, without a browser: the form's aspect ratio, upload and strength →
options; uploads checked (real format, one frame, bytes and pixels from the header) before they
are stored for the worker under the images namespace, and deleted when the job is over; Vary and
Upscale of a result image → the options the worker needs."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from redis import Redis

from core.jobs import JobResult, Reproducibility, SourceImage, Timings
from core.validation import UPSCALE_STRENGTH, VARY_STRENGTHS, InvalidRequest
from settings.config import Settings
from tests.support.fake_discord import snowflake
from web.jobs import WebJobs


def encoded(width: int, height: int, fmt: str = "PNG", frames: int = 1) -> bytes:
    images = [Image.new("RGB", (width, height), colour) for colour in ("red", "blue", "green")[:frames]]
    buffer = io.BytesIO()
    if frames > 1:
        images[0].save(buffer, fmt, save_all=True, append_images=images[1:], duration=100, loop=0)
    else:
        images[0].save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def web(redis_server) -> WebJobs:
    settings = Settings(_env_file=None, redis_url=redis_server.url, queue_prefix=f"webimg{snowflake()[-6:]}",
                        default_model="sd-v1-4", source_max_pixels=300 * 300, source_max_bytes=64 * 1024)
    return WebJobs(Redis.from_url(redis_server.url), settings)


def test_the_form_becomes_options_with_aspect_image_and_strength():
    from web.app import AUTO_ASPECT, options_from_form

    plain = options_from_form("a cat", "", "sd-v1-4", 20, 7.5, -1, 1, None, "standard", aspect="16:9", strength=0.3)
    assert (plain.aspect, plain.source, plain.strength, plain.size) == ("16:9", None, None, None)
    source = SourceImage(image_key="imagine:images:upload-ab:0", width=300, height=200)
    with_image = options_from_form("a cat", "", "sd-v1-4", 20, 7.5, 5, 2, None, "standard", aspect=AUTO_ASPECT,
                                   strength=0.45, source=source)
    assert (with_image.aspect, with_image.source, with_image.strength, with_image.seed) == (None, source, 0.45, 5)
    with pytest.raises(InvalidRequest, match="strength"):
        options_from_form("a cat", "", "sd-v1-4", 20, 7.5, 5, 1, None, aspect=None, strength="nan", source=source)


def test_the_options_queue_an_img2img_job_of_the_images_aspect(web):
    from web.app import options_from_form

    source = web.store_upload(encoded(300, 150))
    options = options_from_form("a cat", "", None, 20, 7.5, 5, 1, None, aspect="auto", strength=0.5, source=source)
    request, _, _ = web.submit(options, "192.0.2.1")
    assert (request.mode, request.strength, request.source.image_key) == ("img2img", 0.5, source.image_key)
    assert request.width == 2 * request.height  # sd-v1-4: 2:1 near 512² pixels
    landscape, _, _ = web.submit(options_from_form("a cat", "", None, 20, 7.5, 5, 1, None, aspect="16:9"), "b")
    assert (landscape.mode, landscape.width > landscape.height) == ("txt2img", True)


@pytest.mark.parametrize("data, message", [
    (b"GIF89a but not really", "not a PNG, JPEG, WebP or GIF image"),
    (encoded(64, 64, "GIF", frames=2), "animated"),
    (encoded(400, 400), "the limit is 0.09 MP"),
    (encoded(64, 64, "BMP"), "must be a PNG, JPEG, WebP or GIF image (it is BMP)"),
    (b"\x89PNG" + b"\x00" * (65 * 1024), "the limit is 0.1 MiB"),
])
def test_bad_uploads_are_refused_in_one_line_and_never_stored(web, data, message):
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")) as refused:
        web.store_upload(data)
    assert "\n" not in str(refused.value)
    assert not web.redis.keys(f"{web.settings.queue_prefix}:images:*")


def test_a_good_upload_waits_under_the_images_namespace_and_goes_when_the_job_does(web):
    from web.app import run_job

    source = web.store_upload(encoded(300, 150, "JPEG"))
    key = source.image_key
    assert key.startswith(f"{web.settings.queue_prefix}:images:upload-") and key.endswith(":0")
    assert (source.width, source.height, source.content_type) == (300, 150, "image/jpeg")
    assert 0 < web.redis.ttl(key) <= web.queue.job_lifetime_s()
    from web.app import options_from_form

    options = options_from_form("a cat", "", None, 20, 7.5, 5, 1, None, strength=0.5, source=source)
    updates = run_job(web, options)
    assert next(updates)[0].startswith("Queued on")
    updates.close()  # the page went away: the job leaves the queue, and its upload with it
    assert not web.redis.exists(key)
    refused = web.store_upload(encoded(300, 150))
    assert list(run_job(web, options_from_form("", "", None, 20, 7.5, 5, 1, None, strength=0.5,
                                               source=refused)))[0][0].startswith("**Cannot generate:**")
    assert not web.redis.exists(refused.image_key), "an upload whose job was refused is deleted at once"


def test_vary_and_upscale_of_a_gallery_image():
    from web.app import action_options, last_job, options_from_form

    options = options_from_form("a fox", "blurry", None, 20, 7.5, 9, 2, None, aspect="3:2")
    request_like = type("R", (), {"model": "sd-v1-4"})()
    repro = Reproducibility(model="sd-v1-4", source="x", pipeline="P", scheduler="S", diffusers_version="0",
                            seeds=[9, 10], steps=20, guidance=7.5, width=576, height=384, prompt="a fox")
    result = JobResult(job_id="web-1", model="sd-v1-4", seeds=[9, 10], width=576, height=384,
                       timings=Timings(queue_wait_ms=1, inference_ms=1, total_ms=1),
                       image_keys=["p:images:web-1:0", "p:images:web-1:1"], reproducibility=repro)
    last = last_job(options, request_like, result)
    subtle = action_options(last, "subtle", 2)
    assert (subtle.mode, subtle.strength, subtle.seed, subtle.count) == ("vary", VARY_STRENGTHS["subtle"], None, 2)
    assert subtle.source.image_key == "p:images:web-1:1" and (subtle.prompt, subtle.negative_prompt) == ("a fox", "blurry")
    assert (subtle.aspect, subtle.width, subtle.model) == (None, None, "sd-v1-4")
    upscale = action_options(last, "upscale", 1)
    assert (upscale.mode, upscale.strength, upscale.seed, upscale.count) == ("upscale", UPSCALE_STRENGTH, 9, 1)
    assert (upscale.width, upscale.height, upscale.source.image_key) == (1152, 768, "p:images:web-1:0")
    for bad_last, number, message in ((None, 1, "Generate an image first"), (last, 3, "from 1 to 2")):
        with pytest.raises(InvalidRequest, match=message):
            action_options(bad_last, "strong", number)


def test_the_page_builds(web):
    from web.app import build_ui

    ui = build_ui(web)
    ids = {block.elem_id for block in ui.blocks.values() if getattr(block, "elem_id", None)}
    assert {"aspect", "image", "vary-subtle", "vary-strong", "upscale", "results", "generate"} <= ids


def test_gradio_refuses_an_oversize_upload_while_receiving_it(web):
    """Gradio stores every upload to disk before any handler runs: without ``max_file_size``
    anyone could send gigabytes (the image input then reads them into memory)."""
    import httpx

    from tests.support.stack import free_port
    from web.app import build_ui, launch_options

    port = free_port()
    settings = web.settings.model_copy(update={"web_host": "127.0.0.1", "web_port": port})
    assert launch_options(settings)["max_file_size"] == settings.source_max_bytes
    ui = build_ui(web)
    ui.launch(**{**launch_options(settings), "theme": None})
    try:
        base = f"http://127.0.0.1:{port}/gradio_api/upload"
        small = httpx.post(base, files={"files": ("ok.png", encoded(16, 16), "image/png")}, timeout=30)
        assert small.status_code == 200
        big = httpx.post(base, files={"files": ("big.png", b"x" * (settings.source_max_bytes * 4), "image/png")},
                         timeout=30)
        assert big.status_code == 413
    finally:
        ui.close()


def test_an_upload_with_a_refused_form_is_deleted_at_once(web):
    """The upload is stored before the form is read: a refused form (a seed no control sends)
    must not leave it in Redis until it expires, or repeated posts fill Redis with uploads."""
    from web.app import build_ui

    ui = build_ui(web)
    generate = next(block.fn for block in ui.fns.values() if getattr(block.fn, "__name__", "") == "generate")
    pattern = f"{web.settings.queue_prefix}:images:upload-*"
    out = list(generate("a cat", "", None, 20, 7.5, "not a number", 1, "auto", "standard", encoded(32, 32), 0.5,
                        None))
    assert "Cannot generate" in out[-1][0] and "seed" in out[-1][0]
    assert list(web.redis.scan_iter(pattern)) == []
