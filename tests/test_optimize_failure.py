"""A model whose optimization fails part-way (worker.pipelines.ResidentPipelines._optimize) is
never served half-optimized, and its steps are never applied twice to the same pipeline: it is
dropped, and answers a one-line ModelLoadError until loaded again."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.jobs import JobRequest
from settings.catalog import ModelEntry
from worker.optimize import optimize as real_optimize
from worker.pipelines import ModelLoadError, ResidentPipelines, weight_bytes

CPU = torch.device("cpu")


def entry(model_dir, key: str = "tiny") -> ModelEntry:
    return ModelEntry(key=key, source=str(model_dir), pipeline="StableDiffusionPipeline", native_size=64,
                      variant=None)


def half_optimize(calls: list):
    """An optimize that applies one step (QKV fused) and then fails, as a compile or
    quantization error would after the earlier steps."""
    def optimize(pipe, options):
        calls.append(pipe)
        pipe.fuse_qkv_projections()
        raise RuntimeError("inductor: compilation failed\nC++ compile error: …")
    return optimize


def fused(pipe) -> bool:
    return any(getattr(module, "fused_projections", False) for module in pipe.unet.modules())


def image_of(pipe) -> np.ndarray:
    from worker.generate import generate

    job = JobRequest(job_id="t", model="tiny", prompt="an orange cat", steps=2, guidance=7.5, seed=3,
                     width=64, height=64)
    return np.asarray(generate(pipe, job).images[0])


def test_a_failure_while_optimizing_at_load_serves_nothing_half_optimized(tiny_model_dir, monkeypatch):
    calls = []
    monkeypatch.setattr("worker.pipelines.optimize", half_optimize(calls))
    pipelines = ResidentPipelines(device=CPU, dtype=torch.float32)
    with pytest.raises(ModelLoadError) as caught:
        pipelines.load(entry(tiny_model_dir))
    message = str(caught.value)
    assert message.startswith("model 'tiny' could not be optimized (RuntimeError: inductor: compilation failed)")
    assert "\n" not in message and fused(calls[0])  # the step applied before the failure
    assert pipelines.keys() == [] and pipelines.resident_keys() == [] and not pipelines.optimized
    # Asked again: the same error, without optimizing the half-optimized pipeline a second time.
    for get in (pipelines.get, pipelines.get_img2img):
        with pytest.raises(ModelLoadError) as again:
            get("tiny")
        assert str(again.value) == message
    assert len(calls) == 1
    # Loading it again is a fresh copy from disk, optimized once, and served.
    monkeypatch.setattr("worker.pipelines.optimize", real_optimize)
    pipelines.load(entry(tiny_model_dir))
    pipe = pipelines.get("tiny")
    assert pipe is not calls[0] and not fused(pipe) and pipelines.optimized == {"tiny"}
    assert image_of(pipe).shape == (64, 64, 3)


def test_a_failure_while_optimizing_on_the_way_to_the_device_drops_that_model_only(tiny_model_dir, monkeypatch):
    pipelines = ResidentPipelines(device=CPU, dtype=torch.float32, budget_bytes=0)  # both load parked
    pipelines.load(entry(tiny_model_dir, "a"))
    pipelines.load(entry(tiny_model_dir, "b"))
    pipelines.budget_bytes = weight_bytes(pipelines.pipes["a"]) + 1  # room for one of the two
    served = pipelines.get("a")
    before = image_of(served)
    calls = []
    monkeypatch.setattr("worker.pipelines.optimize", half_optimize(calls))
    with pytest.raises(ModelLoadError, match=r"^model 'b' could not be optimized .*compilation failed"):
        pipelines.get("b")
    # "a" was parked to make room; "b" is not counted on the device nor kept half-optimized.
    assert pipelines.resident_keys() == [] and pipelines.keys() == ["a"] and "b" not in pipelines.optimized
    with pytest.raises(ModelLoadError, match="^model 'b' could not be optimized"):
        pipelines.get("b")
    assert len(calls) == 1  # never a second optimize of the same object
    # The other model comes back as it was (optimized once already: not again).
    assert pipelines.get("a") is served and pipelines.resident_keys() == ["a"] and len(calls) == 1
    assert np.array_equal(image_of(served), before)
