"""Fast decode and decoded previews (worker.fast_decode): the tiny autoencoder (TAESD's
architecture at toy size, written by worker.tiny) on the tiny pipelines, its fallbacks, and the
catalog's companion weights (tiny_vae_source, the SDXL fp16-fix vae_source)."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from PIL import Image

from core.jobs import JobRequest, SourceImage
from settings.catalog import SDXL_FP16_VAE, TAESD, TAESDXL, ModelEntry, build_catalog
from settings.config import Settings

CPU = torch.device("cpu")
CDN = "https://cdn.discordapp.com/attachments/1/2/cat.png"


def request(**fields) -> JobRequest:
    base = dict(job_id="t", model="tiny", prompt="an orange cat", steps=2, guidance=7.5, seed=3, width=64, height=64)
    return JobRequest(**{**base, **fields})


def entry(model_dir, xl: bool = False, **fields) -> ModelEntry:
    fields = {"tiny_vae_source": str(model_dir / "tiny-vae"), **fields}
    return ModelEntry(key="tiny", source=str(model_dir), native_size=64, variant=None,
                      pipeline="StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline", **fields)


def resident(model_dir, xl: bool = False, fast_decode: bool = True, **fields):
    from worker.pipelines import ResidentPipelines

    pipelines = ResidentPipelines(device=CPU, dtype=torch.float32, tiny_vaes_wanted=True, fast_decode=fast_decode)
    pipelines.load(entry(model_dir, xl, **fields))
    return pipelines


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def fast(request, tiny_model_dir, tiny_xl_model_dir):
    xl = request.param == "sdxl"
    return resident(tiny_xl_model_dir if xl else tiny_model_dir, xl)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


# -- the tiny autoencoder ----------------------------------------------------------------------
def test_tiny_vae_is_saved_and_loaded_by_from_pretrained(tiny_model_dir):
    from worker.fast_decode import decode, label, load_tiny_vae

    tiny_vae = load_tiny_vae(str(tiny_model_dir / "tiny-vae"), CPU, torch.float32)
    assert isinstance(tiny_vae, AutoencoderTiny) and not tiny_vae.training
    # TAESD reads the UNet's latents as they are: its scaling factor is 1.
    assert tiny_vae.config.scaling_factor == 1.0 and tiny_vae.config.latent_channels == 4
    images = decode(tiny_vae, torch.randn(2, 4, 32, 16))
    assert images.shape == (2, 3, 64, 32) and images.min() >= 0 and images.max() <= 1
    assert label(tiny_vae) == f"AutoencoderTiny {tiny_model_dir / 'tiny-vae'}"


def test_a_missing_tiny_vae_is_a_one_line_load_error(tmp_path):
    from worker.fast_decode import load_tiny_vae
    from worker.pipelines import ModelLoadError

    with pytest.raises(ModelLoadError) as caught:
        load_tiny_vae(str(tmp_path / "missing"), CPU, torch.float32)
    assert "tiny autoencoder" in str(caught.value) and "\n" not in str(caught.value)


def test_the_preview_is_decoded_at_the_preview_size(tiny_model_dir):
    from worker.fast_decode import load_tiny_vae, preview_png
    from worker.progress import PREVIEW_PX, latent_preview

    tiny_vae = load_tiny_vae(str(tiny_model_dir / "tiny-vae"), CPU, torch.float32)
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    decoded, projected = pixels(preview_png(tiny_vae, latents, PREVIEW_PX)), pixels(latent_preview(latents, False))
    assert decoded.shape == projected.shape == (PREVIEW_PX, PREVIEW_PX, 3)
    assert np.abs(decoded - projected).mean() > 1
    # The first image's latents, batched or not.
    assert preview_png(tiny_vae, latents[0], PREVIEW_PX) == preview_png(tiny_vae, latents, PREVIEW_PX)


def progress_runtime(pipelines, **settings):
    return SimpleNamespace(pipelines=pipelines, settings=Settings(progress_preview=True, **settings))


def test_progress_previews_use_the_tiny_vae_unless_told_otherwise(tiny_model_dir):
    from worker.progress import latent_preview, preview_function

    pipelines = resident(tiny_model_dir, fast_decode=False)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    projected = latent_preview(latents, False)
    assert preview_function(progress_runtime(pipelines), "tiny")(latents) != projected
    latent = progress_runtime(pipelines, progress_preview_decoder="latent")
    assert preview_function(latent, "tiny")(latents) == projected
    assert pipelines.final_decoder("tiny") is None  # previews only: the VAE still decodes


# -- fast decode -------------------------------------------------------------------------------
def test_fast_decode_makes_images_of_the_job_size(fast):
    from worker.generate import generate, reproducibility

    width, height = 128, 64
    job = request(width=width, height=height, count=2)
    pipe, decoder = fast.get("tiny"), fast.final_decoder("tiny")
    generation = generate(pipe, job, decoder=decoder)
    assert [image.size for image in generation.images] == [(width, height)] * 2
    assert generation.decoder and generation.decoder.startswith("AutoencoderTiny ")
    full = generate(pipe, job)
    assert full.decoder is None and [i.size for i in full.images] == [(width, height)] * 2
    assert np.asarray(full.images[0]).tobytes() != np.asarray(generation.images[0]).tobytes()
    record = reproducibility(fast.entries["tiny"], pipe, job, generation)
    assert record.pipeline == f"{type(pipe).__name__}, decoded by {generation.decoder}"
    assert "decoded by AutoencoderTiny" in record.png_text(3)["pipeline"]
    assert reproducibility(fast.entries["tiny"], pipe, job, full).pipeline == type(pipe).__name__


def sources_of(job: JobRequest, image: Image.Image):
    from worker.generate import Sources
    from worker.source_image import SourceInput

    return Sources({job.job_id: SourceInput(image, "f" * 64, image.size)}, 64)


def test_image_input_still_encodes_with_the_vae_and_upscale_decodes_with_it(fast):
    from worker.generate import generate

    source = Image.new("RGB", (64, 64), (200, 120, 40))
    decoder = fast.final_decoder("tiny")
    vary = request(mode="vary", source=SourceImage(url=CDN), strength=0.5)
    generation = generate(fast.get_img2img("tiny"), vary, sources=sources_of(vary, source), decoder=decoder)
    assert generation.decoder is not None and generation.images[0].size == (64, 64)
    upscale = request(mode="upscale", source=SourceImage(url=CDN), strength=0.3)
    generation = generate(fast.get_img2img("tiny"), upscale, sources=sources_of(upscale, source), decoder=decoder)
    assert generation.decoder is None and generation.images[0].size == (64, 64)


def test_a_broken_tiny_vae_falls_back_with_one_log_line(tiny_model_dir, tmp_path, caplog):
    from worker.generate import generate
    from worker.progress import latent_preview, preview_function

    with caplog.at_level(logging.INFO, logger="worker.pipelines"):
        pipelines = resident(tiny_model_dir, tiny_vae_source=str(tmp_path / "missing"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tiny autoencoder" in warnings[0].getMessage()
    assert "latent-projection previews" in warnings[0].getMessage()
    assert pipelines.tiny_vaes == {} and pipelines.final_decoder("tiny") is None
    latents = torch.randn(1, 4, 32, 32)
    assert preview_function(progress_runtime(pipelines), "tiny")(latents) == latent_preview(latents, False)
    generation = generate(pipelines.get("tiny"), request(), decoder=pipelines.final_decoder("tiny"))
    assert generation.decoder is None and generation.images[0].size == (64, 64)


def test_tiny_vaes_load_only_for_what_uses_them(tiny_model_dir):
    from worker.pipelines import tiny_vaes_wanted

    assert Settings().progress_preview_decoder == "tiny-vae" and Settings().fast_decode is False
    assert not tiny_vaes_wanted(Settings())
    assert tiny_vaes_wanted(Settings(progress_preview=True))
    assert not tiny_vaes_wanted(Settings(progress_preview=True, progress_preview_decoder="latent"))
    assert tiny_vaes_wanted(Settings(fast_decode=True))
    pipelines = resident(tiny_model_dir)
    pipelines.tiny_vaes_wanted = False
    pipelines.load(entry(tiny_model_dir).model_copy(update={"key": "other"}))
    assert "other" not in pipelines.tiny_vaes and "tiny" in pipelines.tiny_vaes


def test_fast_decode_setting_from_the_environment(monkeypatch):
    monkeypatch.setenv("IMAGINE_FAST_DECODE", "true")
    monkeypatch.setenv("IMAGINE_PROGRESS_PREVIEW_DECODER", "latent")
    settings = Settings()
    assert settings.fast_decode is True and settings.progress_preview_decoder == "latent"


# -- catalog -----------------------------------------------------------------------------------
def test_builtin_models_name_their_tiny_vae_and_the_sdxl_fp16_vae():
    catalog = build_catalog()
    assert TAESD == "madebyollin/taesd" and TAESDXL == "madebyollin/taesdxl"
    assert SDXL_FP16_VAE == "madebyollin/sdxl-vae-fp16-fix"
    for key in ("bk-sdm-small", "sd-v1-4"):
        assert catalog[key].tiny_vae_source == TAESD and catalog[key].vae_source is None
    for key in ("ssd-1b", "sdxl-base"):
        assert catalog[key].tiny_vae_source == TAESDXL and catalog[key].vae_source == SDXL_FP16_VAE
        assert catalog[key].vae_revision is None and catalog[key].tiny_vae_revision is None


def test_overrides_turn_companions_off_replace_them_or_drop_them_with_the_source():
    catalog = build_catalog({
        "sd-v1-4": {"tiny_vae_source": None},
        "bk-sdm-small": {"tiny_vae_source": "/models/taesd", "tiny_vae_revision": "main"},
        "sdxl-base": {"vae_source": None, "default_steps": 20},
        "ssd-1b": {"source": "/mnt/ssd-1b"},  # a local copy: nothing more from the hub
        "tiny": {"source": "/models/tiny-sd", "pipeline": "StableDiffusionPipeline"},
    })
    assert catalog["sd-v1-4"].tiny_vae_source is None
    assert (catalog["bk-sdm-small"].tiny_vae_source, catalog["bk-sdm-small"].tiny_vae_revision) == ("/models/taesd", "main")
    assert catalog["sdxl-base"].vae_source is None and catalog["sdxl-base"].tiny_vae_source == TAESDXL
    assert catalog["ssd-1b"].vae_source is None and catalog["ssd-1b"].tiny_vae_source is None
    assert catalog["tiny"].vae_source is None and catalog["tiny"].tiny_vae_source is None
    # A changed source keeps what the override names itself; the same source keeps the defaults.
    named = build_catalog({"ssd-1b": {"source": "/mnt/ssd-1b", "vae_source": "/mnt/fp16-vae"},
                           "sdxl-base": {"source": "stabilityai/stable-diffusion-xl-base-1.0"}})
    assert named["ssd-1b"].vae_source == "/mnt/fp16-vae" and named["ssd-1b"].tiny_vae_source is None
    assert named["sdxl-base"].vae_source == SDXL_FP16_VAE and named["sdxl-base"].tiny_vae_source == TAESDXL


def test_the_worker_wires_fast_decode_from_its_settings(tiny_model_dir):
    from worker.batching import images_for
    from worker.main import load_pipelines
    from worker.runtime import WorkerRuntime

    model = {"source": str(tiny_model_dir), "pipeline": "StableDiffusionPipeline", "native_size": 64,
             "variant": None, "tiny_vae_source": str(tiny_model_dir / "tiny-vae")}
    settings = Settings(_env_file=None, device="cpu", warmup=False, worker_models=["tiny"], models={"tiny": model},
                        fast_decode=True)
    runtime = WorkerRuntime(pipelines=load_pipelines(settings), redis=None, outcomes=None, settings=settings)
    assert set(runtime.pipelines.tiny_vaes) == {"tiny"}
    generation = images_for(runtime, request(), None)
    assert generation.decoder is not None and generation.images[0].size == (64, 64)


def test_warm_up_decodes_with_the_tiny_vae_when_fast_decode_is_on(tiny_model_dir, monkeypatch):
    """The first user job must not be the first call of the fast decoder (CUDA initialisation,
    cuDNN's algorithm search)."""
    import worker.fast_decode
    from worker.main import warm_up

    decoded = []
    original = worker.fast_decode.decode_images
    monkeypatch.setattr(worker.fast_decode, "decode_images",
                        lambda tiny_vae, latents: decoded.append(latents.shape) or original(tiny_vae, latents))
    settings = Settings(_env_file=None, device="cpu", fast_decode=True)
    warm_up(resident(tiny_model_dir, fast_decode=True), settings)
    assert decoded
    decoded.clear()
    warm_up(resident(tiny_model_dir, fast_decode=False), settings)
    assert not decoded


def test_a_tiny_vae_source_holding_another_autoencoder_falls_back(tiny_model_dir, caplog):
    # An operator's slip: the model's own vae/ (an AutoencoderKL) named as its tiny autoencoder.
    from worker.generate import generate

    with caplog.at_level(logging.WARNING, logger="worker.pipelines"):
        pipelines = resident(tiny_model_dir, tiny_vae_source=str(tiny_model_dir / "vae"))
    assert pipelines.tiny_vaes == {} and pipelines.final_decoder("tiny") is None
    assert any("latent-projection previews" in r.getMessage() for r in caplog.records)
    assert generate(pipelines.get("tiny"), request()).images[0].size == (64, 64)  # the worker still serves
