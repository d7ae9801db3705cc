"""Issue 14, core and worker half: aspect ratios (width × height everywhere), image input
(img2img) with the safe source-image path, Vary / Upscale ×2 / Remix on every result.

Real behaviour throughout: real tiny pipelines make real images, real files built with Pillow
go through the worker's checks, a real local HTTP server stands in for Discord's CDN."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import re
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageFile

from core.fleet import effective_steps, work_units
from core.jobs import (
    InputImageError,
    JobRequest,
    Reproducibility,
    SourceImage,
    input_error_message,
)
from core.policy import GuildPolicy, PolicyViolation, apply_policy
from core.records import JobRecord
from core.texts import (
    IMAGE_ACTION_TEMPLATE,
    REMIX_TEMPLATE,
    RESULT_TEMPLATE,
    image_action_custom_id,
    remix_custom_id,
)
from core.validation import (
    ASPECT_RATIOS,
    UPSCALE_STRENGTH,
    VARY_STRENGTHS,
    ImagineOptions,
    InvalidRequest,
    dimensions_for,
    fit_source,
    parse_aspect,
    upscale_dimensions,
)
from settings.catalog import SDXL_BUCKETS, ModelEntry
from settings.config import Settings

CPU = torch.device("cpu")
SETTINGS = Settings(_env_file=None, default_model="bk-sdm-small")
CATALOG = SETTINGS.catalog()
CDN = "https://cdn.discordapp.com/attachments/1/2/cat.png"


def request(**fields) -> JobRequest:
    base = dict(job_id="t", model="tiny", prompt="an orange cat", negative_prompt="blurry",
                steps=4, guidance=7.5, seed=3, width=64, height=64)
    return JobRequest(**{**base, **fields})


def png(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


# -- the contract ------------------------------------------------------------------------------
def test_legacy_size_jobs_and_records_still_load():
    old = {"job_id": "old", "model": "tiny", "prompt": "p", "steps": 2, "guidance": 7.5, "seed": 1, "size": 64}
    loaded = JobRequest.model_validate(old)
    assert (loaded.width, loaded.height, loaded.mode, loaded.source, loaded.strength) == (64, 64, "txt2img", None, None)
    assert "size" not in loaded.model_dump()
    record = JobRecord.model_validate({"job_id": "old", "user_id": 1, "options": {"prompt": "p", "size": 512},
                                       "request": old, "result": None})
    assert (record.request.width, record.request.height) == (64, 64)
    # The options of an old record still become ImagineOptions (size is kept as a square shorthand).
    options = ImagineOptions(**record.options)
    assert apply_policy(options, GuildPolicy(), job_id="x", settings=SETTINGS, catalog=CATALOG).request.width == 512


def test_source_image_has_exactly_one_place_and_image_modes_need_it():
    with pytest.raises(ValueError, match="exactly one"):
        SourceImage()
    with pytest.raises(ValueError, match="exactly one"):
        SourceImage(url=CDN, image_key="imagine:images:a:0")
    with pytest.raises(ValueError, match="needs a source image"):
        request(mode="img2img", strength=0.5)
    with pytest.raises(ValueError):
        request(mode="img2img", source=SourceImage(url=CDN), strength=1.5)
    job = request(mode="vary", source=SourceImage(url=CDN), strength=0.35)
    assert JobRequest.model_validate_json(job.model_dump_json()) == job


def test_png_text_names_mode_strength_and_source():
    record = Reproducibility(model="m", source="s", pipeline="P", scheduler="S", diffusers_version="0",
                             seeds=[1], steps=4, guidance=7.5, width=128, height=64, prompt="p",
                             mode="img2img", strength=0.6, source_sha256="ab" * 32)
    text = record.png_text(1)
    assert (text["mode"], text["strength"], text["source_sha256"], text["width"], text["height"]) == (
        "img2img", "0.6", "ab" * 32, "128", "64")


# -- aspect ratios -----------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["16:9", "16x9", "16X9", "16/9", " 16 : 9 ", "16×9", "16 by 9", "32:18"])
def test_aspect_spellings(spelling):
    assert parse_aspect(spelling) == pytest.approx(16 / 9)


@pytest.mark.parametrize("nonsense", ["", "wide", "16:", ":9", "0:1", "1:0", "5:1", "1:5", "16:9:1", "-1:2",
                                      "1e9:1", "9" * 30 + ":1"])
def test_aspect_nonsense_is_one_clear_line(nonsense):
    with pytest.raises(InvalidRequest) as error:
        parse_aspect(nonsense)
    assert "\n" not in str(error.value) and "aspect" in str(error.value)


@given(w=st.integers(1, 400), h=st.integers(1, 400), sep=st.sampled_from([":", "x", "/", " : ", "×"]),
       key=st.sampled_from(sorted(CATALOG)))
def test_any_sane_ratio_gets_multiples_of_64_near_the_native_pixels(w, h, sep, key):
    entry = CATALOG[key]
    try:
        ratio = parse_aspect(f"{w}{sep}{h}")
    except InvalidRequest:
        assert max(w / h, h / w) > 4
        return
    width, height = dimensions_for(entry, f"{w}{sep}{h}")
    assert width % 64 == 0 and height % 64 == 0
    assert abs(np.log(width / height / ratio)) < 0.25
    assert 0.6 < width * height / entry.native_size**2 < 1.3
    if entry.family == "sdxl":
        assert (width, height) in SDXL_BUCKETS


def test_presets_on_the_four_seed_models():
    sizes = {key: [dimensions_for(CATALOG[key], aspect) for aspect in ASPECT_RATIOS] for key in CATALOG}
    assert sizes["bk-sdm-small"] == sizes["sd-v1-4"] == [
        (512, 512), (576, 448), (448, 576), (704, 384), (384, 704), (576, 384), (384, 576), (768, 320)]
    assert sizes["ssd-1b"] == sizes["sdxl-base"] == [
        (1024, 1024), (1152, 896), (896, 1152), (1344, 768), (768, 1344), (1216, 832), (832, 1216), (1536, 640)]
    for key in CATALOG:  # every preset passes the operator's default limits
        for aspect in ASPECT_RATIOS:
            apply_policy(ImagineOptions("a cat", model=key, aspect=aspect), GuildPolicy(), job_id="x",
                         settings=SETTINGS, catalog=CATALOG)


def test_source_ratio_is_kept_within_the_models_limits():
    sd = CATALOG["bk-sdm-small"]
    assert fit_source(sd, 4032, 3024, 1024 * 1024) == dimensions_for(sd, "4:3")
    assert fit_source(sd, 3024, 4032, 1024 * 1024) == dimensions_for(sd, "3:4")
    assert fit_source(sd, 8000, 100, 1024 * 1024) == dimensions_for(sd, "4:1")  # clamped to 4:1
    assert fit_source(CATALOG["ssd-1b"], 1920, 1080, 1024 * 1024) == (1344, 768)
    width, height = fit_source(CATALOG["ssd-1b"], 1000, 1000, 512 * 512)
    assert width * height <= 512 * 512 and width % 64 == height % 64 == 0
    job = apply_policy(ImagineOptions("a cat", source=SourceImage(url=CDN, width=1920, height=1080)), GuildPolicy(),
                       job_id="x", settings=SETTINGS, catalog=CATALOG).request
    assert (job.mode, job.width, job.height, job.strength) == ("img2img", 704, 384, 0.6)


# -- policy ------------------------------------------------------------------------------------
def test_server_can_forbid_users_images_but_not_vary_or_upscale_of_results():
    closed = GuildPolicy(allow_image_input=False)
    attached = ImagineOptions("a cat", source=SourceImage(url=CDN, width=512, height=512), strength=0.5)
    with pytest.raises(PolicyViolation, match="does not allow image input.*server rule: image input"):
        apply_policy(attached, closed, job_id="x", settings=SETTINGS, catalog=CATALOG)
    for mode, strength, size in (("vary", VARY_STRENGTHS["strong"], 512), ("upscale", UPSCALE_STRENGTH, 1024)):
        options = ImagineOptions("a cat", source=SourceImage(url=CDN), mode=mode, strength=strength,
                                 width=size, height=size)
        job = apply_policy(options, closed, job_id="x", settings=SETTINGS, catalog=CATALOG).request
        assert (job.mode, job.strength, job.width) == (mode, strength, size)


def test_pixel_caps_apply_to_upscales_and_are_never_shrunk_past():
    capped = GuildPolicy(max_pixels=768 * 768, clamp=True)
    width, height = upscale_dimensions(512, 512)
    upscale = ImagineOptions("a cat", source=SourceImage(url=CDN), mode="upscale", strength=UPSCALE_STRENGTH,
                             width=width, height=height)
    with pytest.raises(PolicyViolation, match="upscale to 1024×1024 is over this server's cap"):
        apply_policy(upscale, capped, job_id="x", settings=SETTINGS, catalog=CATALOG)
    # The operator's own limit for upscale outputs holds too.
    big = ImagineOptions("a cat", source=SourceImage(url=CDN), mode="upscale", strength=0.3, width=2048, height=2560)
    with pytest.raises(InvalidRequest, match="An upscale of 2048×2560"):
        apply_policy(big, GuildPolicy(), job_id="x", settings=SETTINGS, catalog=CATALOG)
    # An ordinary job the user sized is clamped (ratio kept) with a note, as the server chose.
    moderated = apply_policy(ImagineOptions("a cat", model="ssd-1b", aspect="16:9"), capped, job_id="x",
                             settings=SETTINGS, catalog=CATALOG)
    request_ = moderated.request
    assert request_.width * request_.height <= 768 * 768 and request_.width > request_.height
    assert moderated.notes and "size lowered" in moderated.notes[0]


def test_a_stored_side_cap_loads_as_pixels():
    stored = json.loads(GuildPolicy().model_dump_json())
    stored.pop("max_pixels")
    stored["max_size"] = 512
    assert GuildPolicy.model_validate(stored).max_pixels == 512 * 512


# -- custom ids and the result's components ----------------------------------------------------
def test_image_action_ids_round_trip_and_do_not_collide_with_older_ones():
    for action in ("subtle", "strong", "upscale"):
        custom_id = image_action_custom_id(action, "ix-123", 3)
        match = re.fullmatch(IMAGE_ACTION_TEMPLATE, custom_id)
        assert match and match.group("action", "job_id", "index") == (action, "ix-123", "3")
        assert re.fullmatch(RESULT_TEMPLATE, custom_id) is None
    assert re.fullmatch(REMIX_TEMPLATE, remix_custom_id("ix-9")).group("job_id") == "ix-9"
    assert re.fullmatch(RESULT_TEMPLATE, "img:vary:ix-1")  # the older seed Variations still match
    with pytest.raises(ValueError):
        image_action_custom_id("subtle", "ix-1", 10)


@pytest.mark.parametrize("count", range(1, 11))
@pytest.mark.parametrize("upscale", [True, False])
def test_result_components_always_fit_discords_limits(count, upscale):
    from worker.delivery import ResultComponents

    view = ResultComponents("ix-" + "9" * 19, "bk-sdm-small", CATALOG, images=list(range(count)), upscale=upscale)
    rows = view.to_components()
    assert len(rows) <= 5 and all(len(row["components"]) <= 5 for row in rows)
    ids = [c["custom_id"] for row in rows for c in row["components"]]
    assert len(ids) == len(set(ids)) and all(len(i) <= 100 for i in ids)
    actions = [m.groups() for i in ids if (m := re.fullmatch(IMAGE_ACTION_TEMPLATE, i))]
    shown = min(count, 5)
    assert len(actions) == shown * (3 if upscale else 2)
    assert any(re.fullmatch(REMIX_TEMPLATE, i) for i in ids)
    assert all(len(c.get("label", "")) <= 80 for row in rows for c in row["components"])


def test_embed_shows_size_mode_strength_and_source():
    from core.jobs import Timings
    from worker.delivery import result_embed

    job = request(width=704, height=384, mode="img2img", source=SourceImage(url=CDN), strength=0.6)
    record = Reproducibility(model="m", source="s", pipeline="P", scheduler="S", diffusers_version="0", seeds=[3],
                             steps=4, guidance=7.5, width=704, height=384, prompt="p", mode="img2img",
                             strength=0.6, source_sha256="0123456789abcdef" * 4)
    embed = result_embed(job, [3], Timings(queue_wait_ms=1, inference_ms=2, total_ms=3), record)
    fields = {f.name: f.value for f in embed.fields}
    assert fields["Size"] == "704×384"
    assert fields["Mode"] == "image to image · strength 0.6 · source `0123456789ab`"


# -- ETA work and batching ---------------------------------------------------------------------
def test_work_units_count_pixels_and_img2img_steps():
    square = request(steps=40, width=512, height=512)
    assert work_units(square) == 40
    assert work_units(request(steps=40, width=1024, height=512)) == 80
    img = request(steps=40, width=512, height=512, mode="img2img", source=SourceImage(url=CDN), strength=0.25)
    assert effective_steps(img) == 10 and work_units(img) == 10
    low = request(steps=2, mode="vary", source=SourceImage(url=CDN), strength=0.35)
    assert effective_steps(low) == 1


def test_batch_key_separates_what_changes_the_work():
    from worker.generate import batch_key, schedule_steps

    base = request()
    assert batch_key(base) == batch_key(request(job_id="other", prompt="x", seed=9))
    different = [request(width=128), request(height=128),
                 request(mode="img2img", source=SourceImage(url=CDN), strength=0.5),
                 request(mode="img2img", source=SourceImage(url=CDN + "?b"), strength=0.5),
                 request(mode="img2img", source=SourceImage(url=CDN), strength=0.6)]
    keys = [batch_key(r) for r in [base, *different]]
    assert len(set(keys)) == len(keys)
    up = dict(mode="upscale", source=SourceImage(url=CDN), strength=0.3)
    assert batch_key(request(job_id="a", **up)) != batch_key(request(job_id="b", **up))  # never batched
    assert schedule_steps(request(steps=2, mode="vary", source=SourceImage(url=CDN), strength=0.35)) == 3


# -- upscale tiling ----------------------------------------------------------------------------
@pytest.mark.parametrize("length, tile, overlap", [(64, 64, 16), (128, 64, 16), (1024, 512, 128),
                                                    (2048, 512, 128), (1344, 1024, 256), (200, 64, 16)])
def test_tiles_cover_with_at_least_the_overlap(length, tile, overlap):
    from worker.generate import tile_starts

    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length or (length <= tile and starts == [0])
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap enough
    assert starts == sorted(set(starts)) and all(s % 8 == 0 for s in starts[:-1])


def test_feathered_blend_reproduces_agreeing_tiles_exactly():
    from worker.generate import blend_tiles, feather, tiles_for

    image = np.asarray(noise(320, 192), dtype=np.float64)
    tiles = tiles_for(320, 192, 128)
    assert len(tiles) == 3 * 2
    pieces = [(x, y, image[y:y + h, x:x + w]) for x, y, w, h in tiles]
    assert np.allclose(blend_tiles(pieces, 320, 192, 32), image)
    ramp = feather(128, 32, lead=True, trail=True)
    assert ramp.min() > 0 and ramp.max() == 1 and ramp[0] < ramp[16] < ramp[40]
    # Two flat tiles of different values blend smoothly across their overlap.
    flat = [(0, 0, np.zeros((64, 128, 1))), (64, 0, np.full((64, 128, 1), 100.0))]
    row = blend_tiles(flat, 192, 64, 64)[0, :, 0]
    assert row[0] == 0 and row[-1] == 100 and np.all(np.diff(row) >= 0)


# -- generation on real tiny pipelines ---------------------------------------------------------
@pytest.fixture(scope="module", params=["sd", "sdxl"])
def resident(request, tiny_model_dir, tiny_xl_model_dir):
    from worker.pipelines import ResidentPipelines

    pipelines = ResidentPipelines(device=CPU, dtype=torch.float32)
    xl = request.param == "sdxl"
    pipelines.load(ModelEntry(key="tiny", source=str(tiny_xl_model_dir if xl else tiny_model_dir), native_size=64,
                              pipeline="StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"))
    return pipelines


def sources_of(job: JobRequest, image: Image.Image, sha: str = "f" * 64):
    from worker.generate import Sources
    from worker.source_image import SourceInput, fit

    return Sources({job.job_id: SourceInput(fit(image, job.width, job.height), sha, image.size)}, 64)


def test_img2img_shares_the_weights_and_is_built_once(resident):
    from worker.pipelines import weight_bytes

    base = resident.get("tiny")
    before = weight_bytes(base)
    image_pipe = resident.get_img2img("tiny")
    assert "Img2Img" in type(image_pipe).__name__ and resident.get_img2img("tiny") is image_pipe
    for name, module in base.components.items():
        if isinstance(module, torch.nn.Module):
            assert image_pipe.components[name] is module
    assert weight_bytes(base) == before


def test_img2img_follows_source_strength_and_seed(resident):
    from worker.generate import generate, reproducibility
    from worker.images import png_bytes

    source = noise(128, 64, seed=5)
    pipe = resident.get_img2img("tiny")

    def run(**fields):
        job = request(width=128, height=64, mode="img2img", source=SourceImage(url=CDN), **fields)
        generation = generate(pipe, job, sources=sources_of(job, source))
        record = reproducibility(resident.entries["tiny"], pipe, job, generation)
        return job, generation, png_bytes(generation.images[0], record.png_text(generation.seeds[0]))

    job, first, data = run(strength=0.5)
    assert first.images[0].size == (128, 64)
    assert run(strength=0.5)[2] == data  # same seed, source and strength: the same bytes
    assert not np.array_equal(np.asarray(run(strength=0.9)[1].images[0]), np.asarray(first.images[0]))
    assert not np.array_equal(np.asarray(run(strength=0.5, seed=4)[1].images[0]), np.asarray(first.images[0]))
    other = noise(128, 64, seed=6)
    job2 = request(width=128, height=64, mode="img2img", source=SourceImage(url=CDN), strength=0.5)
    assert not np.array_equal(np.asarray(generate(pipe, job2, sources=sources_of(job2, other)).images[0]),
                              np.asarray(first.images[0]))
    text = Image.open(io.BytesIO(data)).text
    assert (text["mode"], text["strength"], text["source_sha256"]) == ("img2img", "0.5", "f" * 64)


def test_vary_batches_and_each_image_reproduces_alone(resident):
    from worker.generate import generate

    pipe = resident.get_img2img("tiny")
    source = noise(64, 64, seed=7)
    vary = request(mode="vary", source=SourceImage(url=CDN), strength=VARY_STRENGTHS["strong"], count=2, seed=20)
    both = generate(pipe, vary, sources=sources_of(vary, source))
    alone = request(mode="vary", source=SourceImage(url=CDN), strength=VARY_STRENGTHS["strong"], seed=21)
    second = generate(pipe, alone, sources=sources_of(alone, source))
    assert np.abs(np.asarray(both.images[1], dtype=int) - np.asarray(second.images[0], dtype=int)).max() <= 2


def test_upscale_doubles_in_tiles_and_reproduces(resident):
    from worker.generate import generate, tiles_for

    pipe = resident.get_img2img("tiny")
    result = noise(64, 64, seed=8)
    width, height = upscale_dimensions(64, 64)
    assert len(tiles_for(width, height, 64)) > 1  # 4× the tiny model's native pixels: tiled
    job = request(mode="upscale", source=SourceImage(url=CDN), strength=UPSCALE_STRENGTH, width=width, height=height)
    steps: list[tuple[int, int]] = []
    first = generate(pipe, job, on_step=lambda step, total, latents: steps.append((step, total)),
                     sources=sources_of(job, result))
    assert first.images[0].size == (128, 128)
    assert steps and steps[-1][0] == steps[-1][1]  # progress runs over every tile to the end
    if "XL" not in type(pipe).__name__:  # (SDXL's VAE upcast makes each tile slow on CPU)
        again = generate(pipe, job, sources=sources_of(job, result))
        assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    # Low strength keeps the picture: closer to the resized source than an unrelated image is.
    resized = np.asarray(result.resize((128, 128), Image.Resampling.LANCZOS), dtype=int)
    assert np.abs(np.asarray(first.images[0], dtype=int) - resized).mean() < np.abs(
        np.asarray(noise(128, 128, seed=99), dtype=int) - resized).mean()


def test_txt2img_at_an_aspect_ratio_and_unchanged_by_img2img_use(resident):
    from worker.generate import generate

    job = request(width=128, height=64)
    before = np.asarray(generate(resident.get("tiny"), job).images[0])
    assert before.shape == (64, 128, 3)
    up = request(mode="upscale", source=SourceImage(url=CDN), strength=UPSCALE_STRENGTH, width=128, height=128)
    generate(resident.get_img2img("tiny"), up, sources=sources_of(up, noise(64, 64)))
    assert np.array_equal(np.asarray(generate(resident.get("tiny"), job).images[0]), before)


# -- bad input: real files through the worker's checks -----------------------------------------
LIMITS = Settings(_env_file=None, source_max_bytes=200_000, source_max_pixels=4_000_000)


def decode(data: bytes, claimed: str | None = None):
    from worker.source_image import decode as worker_decode

    return worker_decode(data, LIMITS, claimed)


def refused(data: bytes, claimed: str | None = None) -> str:
    with pytest.raises(InputImageError) as error:
        decode(data, claimed)
    text = str(error.value)
    assert text and "\n" not in text and len(text) < 300
    return text


def bomb_png(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims ``width``×``height``."""
    data = png(Image.new("L", (1, 1)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def test_not_an_image_and_false_claims_are_refused():
    assert "not a PNG, JPEG, WebP or GIF" in refused(b"hello, this is a text file named cat.png", "image/png")
    jpeg = io.BytesIO()
    noise(32, 32).save(jpeg, format="JPEG")
    assert "claims to be image/png but is a JPEG" in refused(jpeg.getvalue(), "image/png")
    assert "damaged" in refused(png(noise(64, 64))[:300])  # truncated: the header reads, the pixels do not
    bmp = io.BytesIO()
    noise(8, 8).save(bmp, format="BMP")
    assert "must be a PNG, JPEG, WebP or GIF" in refused(bmp.getvalue())


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_are_refused_and_still_ones_accepted(fmt):
    assert "animated" in refused(animated(fmt))
    still = io.BytesIO()
    Image.new("RGB", (24, 16), "red").save(still, format=fmt)
    image, _ = decode(still.getvalue(), f"image/{fmt.lower()}")
    assert image.mode == "RGB" and image.size == (24, 16) and image.getpixel((3, 3))[0] > 200


def test_decompression_bombs_are_never_decoded(monkeypatch):
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or None)
    for width, height in ((3000, 3000), (100_000, 100_000), (2**31 - 1, 2**31 - 1)):
        data = bomb_png(width, height)
        assert len(data) < 100
        text = refused(data, "image/png")
        assert "limit" in text and ("MP" in text or "megapixels" in text)
    assert decoded == []


def test_oversize_files_are_refused():
    big = png(noise(300, 300))
    assert len(big) > LIMITS.source_max_bytes
    assert "limit is 0.2 MiB" in refused(big)


def test_modes_are_converted_not_refused():
    cmyk = io.BytesIO()
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(cmyk, format="JPEG")  # red in CMYK
    image, _ = decode(cmyk.getvalue(), "image/jpeg")
    assert image.mode == "RGB" and image.size == (16, 8)
    r, g, b = image.getpixel((8, 4))
    assert r > 200 and g < 60 and b < 60

    palette = Image.new("P", (8, 8))
    palette.putpalette([0, 0, 255] * 256)
    assert decode(png(palette))[0].getpixel((0, 0)) == (0, 0, 255)

    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    clear.putpixel((0, 0), (255, 0, 0, 255))
    rgba, _ = decode(png(clear))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 0, 0) and rgba.getpixel((1, 1)) == (255, 255, 255)

    grey_alpha = Image.new("LA", (8, 8), (0, 0))
    assert decode(png(grey_alpha))[0].getpixel((3, 3)) == (255, 255, 255)  # transparent black → white

    deep = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert deep.mode.startswith("I")
    values = [decode(png(deep))[0].getpixel((x, 0))[0] for x in range(3)]
    assert values == [0, 128, 255]  # scaled, not clipped to white


def test_only_the_four_formats_plugins_ever_read_a_users_bytes(monkeypatch):
    """No other Pillow plugin parses a user's file, not even its header: EPS (Ghostscript on
    load), TIFF, PSD, ICO, BMP are named from their magic bytes and refused."""
    from PIL import (
        BmpImagePlugin,
        EpsImagePlugin,
        IcoImagePlugin,
        PsdImagePlugin,
        TiffImagePlugin,
    )

    from core.attachments import inspect_image

    opened = []
    for plugin in (EpsImagePlugin.EpsImageFile, TiffImagePlugin.TiffImageFile, BmpImagePlugin.BmpImageFile,
                   IcoImagePlugin.IcoImageFile, PsdImagePlugin.PsdImageFile):
        monkeypatch.setattr(plugin, "_open", lambda self, name=plugin.__name__: opened.append(name))
    files = {"EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n",
             "PSD": b"8BPS\x00\x01" + b"\x00" * 40, "ICO": b"\x00\x00\x01\x00\x01\x00" + b"\x00" * 40}
    for fmt in ("TIFF", "BMP"):
        buffer = io.BytesIO()
        noise(8, 8).save(buffer, format=fmt)
        files[fmt] = buffer.getvalue()
    for fmt, data in files.items():
        assert f"must be a PNG, JPEG, WebP or GIF image (it is {fmt})" in refused(data), fmt
        with pytest.raises(InvalidRequest, match=f"it is {fmt}"):
            inspect_image(data, max_bytes=10**6, max_pixels=10**6)
    assert opened == []


def test_a_jpeg_with_more_images_after_it_is_its_first_image():
    """MPO (a JPEG whose APP2 lists more images: phones' HDR gain maps, stereo cameras) is a
    JPEG to the user: its first image is used, the others are never decoded."""
    from core.attachments import inspect_image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), "red").save(buffer, format="MPO", save_all=True,
                                           append_images=[Image.new("RGB", (1500, 1500), "blue")])
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    facts = inspect_image(data, max_bytes=10**6, max_pixels=48 * 32, claimed_type="image/jpeg")
    assert (facts.format, facts.width, facts.height, facts.content_type) == ("JPEG", 48, 32, "image/jpeg")
    image, _ = decode(data, "image/jpeg")
    assert image.size == (48, 32) and image.getpixel((5, 5))[0] > 200


def test_exif_rotated_photos_are_turned_as_the_user_sees_them():
    stored = Image.new("RGB", (40, 20), "white")
    stored.paste((255, 0, 0), (0, 0, 10, 20))  # red on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    image, digest = decode(buffer.getvalue(), "image/jpeg")
    assert image.size == (20, 40)
    red = image.getpixel((10, 3))  # the left edge, turned clockwise, is the top
    assert red[0] > 200 and red[1] < 80
    assert digest == hashlib.sha256(buffer.getvalue()).hexdigest()


def test_fit_centre_crops_to_the_jobs_ratio():
    from worker.source_image import fit

    wide = Image.new("RGB", (400, 100), "blue")
    wide.paste((255, 0, 0), (150, 0, 250, 100))  # red in the middle
    fitted = fit(wide, 64, 64)
    assert fitted.size == (64, 64) and fitted.getpixel((32, 32))[0] > 200


# -- downloads: only Discord's CDN, with a timeout and a byte limit -----------------------------
class Cdn:
    """A local stand-in for Discord's CDN that counts every request it gets."""

    def __init__(self, files: dict[str, tuple[int, bytes]], delay_s: float = 0.0):
        self.requests: list[str] = []
        cdn = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                cdn.requests.append(self.path)
                status, body = files.get(self.path.split("?")[0], (404, b"Not Found"))
                if self.path.startswith("/attachments/slow"):
                    time.sleep(delay_s)
                if self.path.startswith("/attachments/headdrip"):  # headers a byte at a time
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    for byte in b"X-Slow: " + b"y" * 40:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.1)
                    return
                self.send_response(status)
                if not self.path.startswith(("/attachments/nolength", "/attachments/drip")):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path.startswith("/attachments/drip"):  # a byte now and then, never done
                    for _ in range(20):
                        self.wfile.write(b"x" * 100)
                        self.wfile.flush()
                        time.sleep(0.2)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def cdn_server():
    picture = png(noise(96, 48))
    server = Cdn({"/attachments/1/2/cat.png": (200, picture), "/attachments/1/2/gone.png": (404, b"gone"),
                  "/attachments/1/2/denied.png": (403, b"expired"), "/attachments/slow/2/cat.png": (200, picture),
                  "/attachments/1/2/big.png": (200, b"x" * 300_000),
                  "/attachments/nolength/2/big.png": (200, b"x" * 300_000),
                  "/attachments/drip/2/cat.png": (200, b""), "/attachments/headdrip/2/cat.png": (200, b""),
                  "/attachments/1/2/moved.png": (302, b"")}, delay_s=2.0)
    server.picture = picture
    yield server
    server.close()


@pytest.fixture()
def cdn(cdn_server):
    cdn_server.requests.clear()
    return cdn_server


def settings_for(api_base: str, **fields) -> Settings:
    return Settings(_env_file=None, discord_api_base=f"{api_base}/api/v10", source_max_bytes=200_000,
                    source_timeout_s=0.5, **fields)


def test_an_attachment_downloads_checks_and_fits(cdn):
    from worker.source_image import load_source

    source = SourceImage(url=f"{cdn.base}/attachments/1/2/cat.png?ex=1&is=2&hm=3", content_type="image/png")
    loaded = load_source(source, 128, 64, settings_for(cdn.base), redis=None)
    assert loaded.image.size == (128, 64) and loaded.original_size == (96, 48)
    assert loaded.sha256 == hashlib.sha256(cdn.picture).hexdigest()


def test_foreign_hosts_are_refused_without_any_request(cdn):
    from worker.source_image import download

    elsewhere = Cdn({"/attachments/1/2/cat.png": (200, cdn.picture)})
    try:
        for url in (f"{elsewhere.base}/attachments/1/2/cat.png", f"{cdn.base}/not-attachments/cat.png",
                    "file:///etc/passwd", f"{cdn.base.replace('http', 'ftp')}/attachments/1/2/cat.png"):
            with pytest.raises(InputImageError, match="not a Discord attachment"):
                download(url, settings_for(cdn.base))
        with pytest.raises(InputImageError, match="not a Discord attachment"):  # real Discord: https only
            download("http://cdn.discordapp.com/attachments/1/2/cat.png", Settings(_env_file=None))
        assert elsewhere.requests == [] and cdn.requests == []
        # An operator's own list replaces the derived one.
        assert download(f"{elsewhere.base}/attachments/1/2/cat.png",
                        settings_for(cdn.base, attachment_hosts=[elsewhere.base.split("//")[1]])) == cdn.picture
    finally:
        elsewhere.close()


@pytest.mark.parametrize("url", [
    "https://cdn.discord\tapp.com/attachments/1/2/cat.png",  # urlsplit drops the tab; the client may not
    "https://cdn.discordapp.com\n/attachments/1/2/cat.png",
    " https://cdn.discordapp.com/attachments/1/2/cat.png",
    "https://cdn.discordapp.com/attachments/1/2/cat.png\r\nX-Injected: 1",
    "https://cdn.discordapp.com\\@evil.example/attachments/1/2/cat.png",
    "https://evil.example\\@cdn.discordapp.com/attachments/1/2/cat.png",
    "https://cdn.discordapp.com\\.evil.example/attachments/1/2/cat.png",
    "https://cdn.discord\u0430pp.com/attachments/1/2/cat.png",  # Cyrillic a
    "https://cdn\u3002discordapp\u3002com/attachments/1/2/cat.png",  # ideographic full stops (IDNA: dots)
    "https://\uff43dn.discordapp.com/attachments/1/2/cat.png",  # fullwidth c (NFKC: c)
    "https://cdn.discordapp.com@evil.example/attachments/1/2/cat.png",
    "https://cdn.discordapp.com:443@evil.example/attachments/1/2/cat.png",
    "https://cdn.discordapp.com./attachments/1/2/cat.png",
    "https://cdn.discordapp.com:8443/attachments/1/2/cat.png",
    "https://cdn.discordapp.com%2eevil.example/attachments/1/2/cat.png",
    "https://[::1]/attachments/1/2/cat.png",
    "https://cdn.discordapp.com//attachments/1/2/cat.png",
    "http://cdn.discordapp.com/attachments/1/2/cat.png",
    "https://cdn.discordapp.com?x=/attachments/1/2/cat.png",
    "https://cdn.discordapp.com#/attachments/1/2/cat.png",
])
def test_other_spellings_of_the_cdn_are_refused(url):
    from core.attachments import is_attachment_url

    assert not is_attachment_url(url, "https://discord.com/api/v10")
    assert is_attachment_url("https://CDN.DiscordApp.com/attachments/1/2/cat.png?ex=1&is=2&hm=3",
                             "https://discord.com/api/v10")


@pytest.mark.parametrize("path, message", [
    ("/attachments/1/2/gone.png", "expired or the file was deleted"),
    ("/attachments/1/2/denied.png", "expired or the file was deleted"),
    ("/attachments/1/2/moved.png", "could not be downloaded (Discord answered 302)"),
    ("/attachments/1/2/big.png", "the limit is 0.2 MiB"),
    ("/attachments/nolength/2/big.png", "over the limit of 0.2 MiB"),
    ("/attachments/slow/2/cat.png", "longer than 0.5 s"),
    ("/attachments/drip/2/cat.png", "longer than 0.5 s"),
    ("/attachments/headdrip/2/cat.png", "longer than 0.5 s"),  # never done sending its headers
])
def test_download_failures_are_one_line(cdn, path, message):
    from worker.source_image import download

    started = time.monotonic()
    with pytest.raises(InputImageError, match=re.escape(message)) as error:
        download(f"{cdn.base}{path}", settings_for(cdn.base))
    assert "\n" not in str(error.value) and time.monotonic() - started < 1.9
    assert len(cdn.requests) == 1  # one try: never retried


class FakeRedis(dict):
    def get(self, key):  # noqa: A003
        return super().get(key)


def test_web_images_only_from_this_deployments_namespace():
    from worker.source_image import fetch_bytes

    redis = FakeRedis({"imagine:images:web-1:0": b"png", "other:images:web-1:0": b"secret",
                       "imagine:record:web-1": b"{}"})
    settings = Settings(_env_file=None)
    assert fetch_bytes(SourceImage(image_key="imagine:images:web-1:0"), settings, redis) == b"png"
    for key in ("other:images:web-1:0", "imagine:record:web-1", "imagine:images:web-1:0:x"):
        with pytest.raises(InputImageError, match="not one of this service's results"):
            fetch_bytes(SourceImage(image_key=key), settings, redis)
    with pytest.raises(InputImageError, match="no longer stored"):
        fetch_bytes(SourceImage(image_key="imagine:images:web-2:0"), settings, redis)


def test_the_users_line_survives_the_failure_paths():
    from worker.failures import GENERIC, friendly_reason

    error = InputImageError("The image's link has expired or the file was deleted; attach it again.")
    assert friendly_reason(InputImageError, error) == str(error)
    stored = ("Traceback (most recent call last):\n  File \"x\", line 1\n"
              f"core.jobs.InputImageError: {error}\n")
    assert input_error_message(stored) == str(error) and friendly_reason(stored) == str(error)
    assert friendly_reason(RuntimeError, RuntimeError("secret details")) == GENERIC


# -- through a real worker: a web Vary job runs, a bad source fails once and is told once -------
def test_worker_runs_image_jobs_and_tells_a_bad_source_once(redis_server, tiny_model_dir, monkeypatch):
    from redis import Redis
    from rq.job import Job, JobStatus
    from rq.serializers import JSONSerializer

    from core.jobs import Delivery
    from core.queue import JobQueue
    from tests.support.fake_discord import snowflake
    from worker import failures
    from worker.delivery import Posted
    from worker.main import build_worker
    from worker.outcomes import Outcomes
    from worker.pipelines import ResidentPipelines
    from worker.runtime import WorkerRuntime, install_runtime
    from worker.safety import load_safety_checker

    redis = Redis.from_url(redis_server.url)
    prefix = f"iw{snowflake()[-6:]}"
    settings = Settings(_env_file=None, queue_prefix=prefix, discord_api_base="http://127.0.0.1:9/api/v10",
                        min_size=64, safety_source=str(tiny_model_dir), safety_threshold=1e9)
    pipelines = ResidentPipelines(device=CPU, dtype=torch.float32)
    pipelines.load(ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline",
                              native_size=64))
    install_runtime(WorkerRuntime(pipelines=pipelines, redis=redis, settings=settings,
                                  outcomes=Outcomes(redis, prefix, settings.failure_ttl_s),
                                  safety=load_safety_checker(settings, CPU, torch.float32)))
    told: list[tuple[int, str]] = []
    monkeypatch.setattr(failures, "post_failure",
                        lambda delivery, text, *args, **kwargs: told.append((delivery.user_id, text)) or Posted(7, "webhook"))

    source_png = png(noise(64, 64, seed=3))
    redis.set(f"{prefix}:images:web-src:0", source_png)
    web = request(job_id=f"{prefix}-web", mode="vary", strength=0.75, store_images=True,
                  source=SourceImage(image_key=f"{prefix}:images:web-src:0"))
    bad = request(job_id=f"{prefix}-bad", mode="img2img", strength=0.6,
                  source=SourceImage(url="https://example.com/attachments/1/2/cat.png"),
                  delivery=Delivery(application_id=1, interaction_id=2, interaction_token="tok", user_id=33))
    jobs = JobQueue(redis, settings)
    jobs.submit(web)
    jobs.submit(bad)
    build_worker(settings, ["tiny"], redis).work(burst=True)

    result = Job.fetch(web.job_id, connection=redis, serializer=JSONSerializer).latest_result().return_value
    record = result["reproducibility"]
    assert (record["mode"], record["strength"], record["source_sha256"], record["pipeline"]) == (
        "vary", 0.75, hashlib.sha256(source_png).hexdigest(), "StableDiffusionImg2ImgPipeline")
    stored = Image.open(io.BytesIO(redis.get(result["image_keys"][0])))
    assert stored.size == (64, 64) and (stored.text["mode"], stored.text["strength"]) == ("vary", "0.75")
    assert stored.text["source_sha256"] == record["source_sha256"]

    failed = Job.fetch(bad.job_id, connection=redis, serializer=JSONSerializer)
    assert failed.get_status() == JobStatus.FAILED and failed.retries_left == 0  # not retried
    assert told == [(33, "The image link is not a Discord attachment, so it was not fetched.")]
    assert input_error_message(failed.latest_result().exc_string) == told[0][1]
    # The failed-job sweep finds it told already: no second message.
    assert failures.report_untold_failures(jobs.queue("tiny"), failures.Reporter(
        Outcomes(redis, prefix, settings.failure_ttl_s)), 3600) == 0 and len(told) == 1


def test_fast_mode_works_for_image_jobs_on_the_shared_weights(tiny_model_dir):
    """Fast mode's adapter sits on the shared UNet: an img2img fast job switches it on for its call
    only, with its own LCM scheduler; text-to-image afterwards is what it was before."""
    from settings.catalog import FastMode
    from worker.generate import generate, has_fast_adapter
    from worker.pipelines import ResidentPipelines

    entry = ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline", native_size=64,
                       variant=None, fast=FastMode(adapter=str(tiny_model_dir / "fast-lora"), steps=2))
    pipelines = ResidentPipelines(device=CPU, dtype=torch.float32)
    pipelines.load(entry)
    plain = request(steps=2)
    before = np.asarray(generate(pipelines.get("tiny"), plain).images[0])
    image_pipe = pipelines.get_img2img("tiny")
    assert has_fast_adapter(image_pipe)
    fast = request(steps=4, guidance=1.0, quality="fast", mode="vary", source=SourceImage(url=CDN),
                   strength=VARY_STRENGTHS["strong"])
    generation = generate(image_pipe, fast, fast=entry.fast, sources=sources_of(fast, noise(64, 64)))
    assert generation.scheduler == "LCMScheduler" and generation.adapter == entry.fast.adapter
    assert np.array_equal(np.asarray(generate(pipelines.get("tiny"), plain).images[0]), before)


def test_cli_runs_img2img_and_upscale_from_a_local_file(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from worker.cli import main

    models = {"tiny": {"source": str(tiny_model_dir), "pipeline": "StableDiffusionPipeline", "native_size": 64,
                       "variant": None}}
    monkeypatch.setenv("IMAGINE_MODELS", json.dumps(models))
    monkeypatch.setenv("IMAGINE_MIN_SIZE", "64")
    monkeypatch.chdir(tmp_path)
    photo = tmp_path / "photo.png"
    noise(200, 100).save(photo)
    common = ["a watercolour", "--model", "tiny", "--steps", "2", "--seed", "4", "--image", str(photo)]
    assert main([*common, "--strength", "0.5", "--out", str(tmp_path / "paint.png")]) == 0
    assert Image.open(tmp_path / "paint.png").size == (128, 64)  # the photo's 2:1, near the native pixels
    assert "img2img from" in capsys.readouterr().out
    assert main([*common, "--upscale", "--width", "128", "--height", "64", "--out", str(tmp_path / "up.png")]) == 0
    assert Image.open(tmp_path / "up.png").size == (128, 64)
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["x", "--model", "tiny", "--image", str(tmp_path / "notes.png")]) == 2
    assert "not a PNG, JPEG, WebP or GIF" in capsys.readouterr().err
