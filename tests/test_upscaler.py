"""Upscale ×2 with a dedicated upscaler (IMAGINE_UPSCALER_SOURCE): a real tiny
StableDiffusionLatentUpscalePipeline saved to a folder, loaded at worker start, used for SD 1.x
models' Upscale jobs; unset, the tiled img2img path runs as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.jobs import JobRequest, SourceImage
from core.validation import UPSCALE_STRENGTH
from settings.config import Settings

CDN = "https://cdn.discordapp.com/attachments/1/2/cat.png"


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory):
    from worker.tiny import write_tiny_upscaler

    return write_tiny_upscaler(tmp_path_factory.mktemp("models") / "tiny-upscaler")


def runtime_for(tiny_model_dir, monkeypatch, **fields):
    """A worker runtime as worker.main builds it (no warm-up), its source fetch stubbed out."""
    from worker import source_image
    from worker.main import load_pipelines
    from worker.runtime import WorkerRuntime

    settings = Settings(_env_file=None, device="cpu", warmup=False, worker_models=["tiny"],
                        models={"tiny": {"source": str(tiny_model_dir), "pipeline": "StableDiffusionPipeline",
                                         "native_size": 64, "variant": None}}, **fields)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))

    def load_source(source, width, height, *_args):
        return source_image.SourceInput(source_image.fit(picture, width, height), "f" * 64, picture.size)

    monkeypatch.setattr(source_image, "load_source", load_source)
    return WorkerRuntime(pipelines=load_pipelines(settings), redis=None, outcomes=None, settings=settings)


def upscale(runtime, seed: int = 3):
    from worker.batching import images_for
    from worker.generate import reproducibility

    job = JobRequest(job_id=f"up-{seed}", model="tiny", prompt="an orange cat", negative_prompt="blurry",
                     steps=4, guidance=7.5, seed=seed, width=128, height=128, mode="upscale",
                     source=SourceImage(url=CDN), strength=UPSCALE_STRENGTH)
    steps: list[tuple[int, int]] = []
    generation = images_for(runtime, job, lambda step, total, _latents: steps.append((step, total)))
    pipelines = runtime.pipelines
    record = reproducibility(pipelines.entries["tiny"], pipelines.get_img2img("tiny"), job, generation)
    return generation, record, steps


def test_the_upscaler_serves_sd1_upscales_and_reproduces(tiny_model_dir, upscaler_dir, monkeypatch):
    runtime = runtime_for(tiny_model_dir, monkeypatch, upscaler_source=str(upscaler_dir))
    generation, record, steps = upscale(runtime)
    assert generation.images[0].size == (128, 128) and (record.width, record.height) == (128, 128)
    assert record.pipeline == f"StableDiffusionLatentUpscalePipeline ({upscaler_dir})"
    assert record.scheduler == "EulerDiscreteScheduler" and record.adapter is None
    assert steps and steps[-1] == (4, 4)
    again, _, _ = upscale(runtime)
    assert np.array_equal(np.asarray(generation.images[0]), np.asarray(again.images[0]))
    other, _, _ = upscale(runtime, seed=4)
    assert not np.array_equal(np.asarray(generation.images[0]), np.asarray(other.images[0]))


def test_unset_keeps_the_tiled_img2img_path(tiny_model_dir, monkeypatch):
    runtime = runtime_for(tiny_model_dir, monkeypatch)
    assert runtime.pipelines.upscaler is None
    generation, record, _ = upscale(runtime)
    assert generation.images[0].size == (128, 128)
    assert record.pipeline == "StableDiffusionImg2ImgPipeline"


def test_sdxl_models_keep_the_tiled_path(upscaler_dir):
    from settings.catalog import ModelEntry
    from worker.upscaler import load_upscaler

    upscaler = load_upscaler(str(upscaler_dir), None, torch.device("cpu"), torch.float32)
    xl = ModelEntry(key="xl", source="x", pipeline="StableDiffusionXLPipeline")
    sd = ModelEntry(key="sd", source="x", pipeline="StableDiffusionPipeline")
    assert not upscaler.serves(xl) and upscaler.serves(sd)
