"""Job records (real Redis) and the options each result button asks for."""

from __future__ import annotations

import json

from redis import Redis

from bot.buttons import model_switch_options, reroll_options, variation_options
from core.jobs import Delivery, JobRequest, Reproducibility
from core.records import JobRecord, RecordStore


def record(**options) -> JobRecord:
    request = JobRequest(job_id="ix-5", model="tiny", prompt="a fox", negative_prompt="blurry", steps=2,
                         guidance=7.5, seed=100, size=64, count=2,
                         delivery=Delivery(application_id=1, interaction_id=5, interaction_token="tok-secret",
                                           user_id=42, guild_id=7))
    return JobRecord(job_id="ix-5", user_id=42, guild_id=7, request=request,
                     options={"prompt": "a fox", "negative_prompt": "blurry", "model": None, "steps": None,
                              "guidance": None, "seed": 100, "size": None, "count": 2, **options})


def test_button_options():
    assert reroll_options(record()).seed is None and reroll_options(record()).count == 2
    varied = variation_options(record(), count=4)
    assert (varied.seed, varied.count, varied.prompt, varied.negative_prompt) == (102, 4, "a fox", "blurry")
    switched = model_switch_options(record(), "sdxl-base")
    assert (switched.model, switched.seed, switched.size, switched.steps) == ("sdxl-base", 100, None, None)
    assert model_switch_options(record(size=512), "sdxl-base").size == 512  # the user's own choice stays


def test_records_round_trip_without_the_token(redis_server):
    store = RecordStore(Redis.from_url(redis_server.url), prefix="unit-records", ttl_s=60)
    store.save(record())
    raw = store.redis.hgetall("unit-records:record:ix-5")
    assert b"tok-secret" not in b"".join(raw.values())
    assert 0 < store.redis.ttl("unit-records:record:ix-5") <= 60
    repro = Reproducibility(model="tiny", source="/m", pipeline="P", scheduler="S", diffusers_version="0.42.1",
                            seeds=[100, 101], steps=2, guidance=7.5, width=64, height=64, prompt="a fox")
    store.attach_result("ix-5", repro)
    loaded = store.load("ix-5")
    assert loaded.request.delivery is None and loaded.result == repro and loaded.options["seed"] == 100
    assert store.user_jobs(42) == ["ix-5"] and store.load("ix-missing") is None
    assert repro.png_text(101)["seed"] == "101" and repro.png_text(101)["guidance"] == "7.5"
    assert repro.png_text(101)["revision"] == ""


# -- the catalog's replacement VAE in the record, ℹ Info and the PNG text ----------------------
SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"


def sdxl_entry(**fields):
    from settings.catalog import build_catalog

    return build_catalog({"sdxl-base": {"vae_revision": "0123abcd", **fields}})["sdxl-base"]


def made(request: JobRequest, **fields):
    from PIL import Image

    from worker.generate import Generation

    return Generation([Image.new("RGB", (64, 64))] * request.count, request.seeds(), 1.0, 0.0,
                      scheduler="EulerDiscreteScheduler", **fields)


def vae_record(entry, request: JobRequest, **fields) -> Reproducibility:
    from types import SimpleNamespace

    from worker.generate import reproducibility

    return reproducibility(entry, SimpleNamespace(scheduler=object()), request, made(request, **fields))


def info_fields(result: Reproducibility, request: JobRequest) -> dict[str, str]:
    from bot.buttons import info_embed

    embed = info_embed(JobRecord(job_id=request.job_id, user_id=42, options={}, request=request, result=result))
    return {f.name: f.value for f in embed.fields}


def test_the_replacement_vae_is_named_when_it_decoded_the_images():
    entry = sdxl_entry()
    assert entry.vae_source == SDXL_VAE  # the built-in SDXL entry swaps in the fp16-safe VAE
    job = record().request
    result = vae_record(entry, job)
    assert (result.vae, result.vae_revision) == (SDXL_VAE, "0123abcd")
    assert info_fields(result, job)["Pipeline"] == f"{result.pipeline}\nVAE `{SDXL_VAE}` @ 0123abcd"
    text = result.png_text(100)
    assert (text["vae"], text["vae_revision"]) == (SDXL_VAE, "0123abcd")
    from worker.delivery import reproducibility_footer

    assert f"VAE {SDXL_VAE} @ 0123abcd · " in reproducibility_footer(result)  # the result message too
    unpinned = vae_record(sdxl_entry(vae_revision=None), job)
    assert (unpinned.vae, unpinned.vae_revision) == (SDXL_VAE, None)
    assert info_fields(unpinned, job)["Pipeline"].endswith(f"VAE `{SDXL_VAE}` @ default revision")
    assert unpinned.png_text(100)["vae_revision"] == ""


def test_the_replacement_vae_is_not_named_when_it_made_no_pixels():
    entry, job = sdxl_entry(), record().request
    tiny = vae_record(entry, job, decoder="AutoencoderTiny madebyollin/taesdxl")  # fast decode, txt2img
    assert (tiny.vae, tiny.vae_revision) == (None, None)
    assert info_fields(tiny, job)["Pipeline"] == tiny.pipeline and "VAE" not in tiny.pipeline
    assert tiny.pipeline.endswith("decoded by AutoencoderTiny madebyollin/taesdxl")
    assert (tiny.png_text(100)["vae"], tiny.png_text(100)["vae_revision"]) == ("", "")
    upscaled = vae_record(entry, job, pipeline="StableDiffusionLatentUpscalePipeline (up)")  # its own VAE
    assert (upscaled.vae, upscaled.vae_revision) == (None, None)


def test_image_input_is_encoded_by_the_replacement_vae_even_with_fast_decode():
    from core.jobs import SourceImage

    job = JobRequest(job_id="ix-6", model="sdxl-base", prompt="a fox", steps=2, guidance=7.5, seed=1, size=64,
                     mode="img2img", source=SourceImage(url="https://cdn.discordapp.com/attachments/1/2/a.png"),
                     strength=0.5)
    result = vae_record(sdxl_entry(), job, decoder="AutoencoderTiny madebyollin/taesdxl", source_sha256="ab" * 32)
    assert (result.vae, result.vae_revision) == (SDXL_VAE, "0123abcd")


def test_a_model_with_its_own_vae_names_none():
    from settings.catalog import build_catalog

    entry = build_catalog()["sd-v1-4"]
    assert entry.vae_source is None
    job = record().request
    result = vae_record(entry, job)
    assert (result.vae, result.vae_revision) == (None, None)
    fields = info_fields(result, job)
    assert fields["Pipeline"] == result.pipeline == "SimpleNamespace" and "VAE" not in "".join(fields.values())
    from worker.delivery import reproducibility_footer

    assert "VAE" not in reproducibility_footer(result)
    assert (result.png_text(100)["vae"], result.png_text(100)["vae_revision"]) == ("", "")


def test_a_record_stored_before_the_vae_fields_still_loads(redis_server):
    store = RecordStore(Redis.from_url(redis_server.url), prefix="unit-old-records", ttl_s=60)
    store.save(record())
    new = vae_record(sdxl_entry(), record().request)
    old = new.model_dump(mode="json", exclude={"vae", "vae_revision"})
    store.redis.hset("unit-old-records:record:ix-5", "result", json.dumps(old))
    loaded = store.load("ix-5").result
    assert (loaded.vae, loaded.vae_revision) == (None, None)
    assert loaded == new.model_copy(update={"vae": None, "vae_revision": None})
    assert info_fields(loaded, record().request)["Pipeline"] == loaded.pipeline
