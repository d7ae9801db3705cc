"""CUDA out of memory, simulated on CPU: the pipeline raises torch's real OutOfMemoryError when
asked for more images per call than it 'fits'. generate() must split the batch (same seeds,
same pixels), and when even one image does not fit, free memory and raise for a clear report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.jobs import JobRequest
from settings.catalog import ModelEntry
from worker.failures import friendly_reason
from worker.generate import generate
from worker.pipelines import load_pipeline


class OutOfMemoryAbove:
    """The real pipeline, raising CUDA OOM for calls with more than ``limit`` images."""

    def __init__(self, pipe, limit: int):
        self.pipe, self.limit, self.calls = pipe, limit, []

    def __getattr__(self, name):  # scheduler, components, device…: the real pipeline's
        if "pipe" not in self.__dict__:  # copy.copy probes a bare instance first
            raise AttributeError(name)
        return getattr(self.__dict__["pipe"], name)

    def __call__(self, **kwargs):
        images = len(kwargs["prompt"]) * kwargs["num_images_per_prompt"]
        self.calls.append(images)
        if images > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.pipe(**kwargs)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    entry = ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline",
                       native_size=64, default_steps=2, variant=None)
    return load_pipeline(entry, torch.device("cpu"), torch.float32)


def request(count: int) -> JobRequest:
    return JobRequest(job_id="oom", model="tiny", prompt="a red fox", steps=2, guidance=7.0,
                      seed=100, size=64, count=count)


def test_oom_splits_the_batch_and_keeps_every_image(pipe):
    expected = generate(pipe, request(4))
    oom = OutOfMemoryAbove(pipe, limit=1)
    got = generate(oom, request(4))
    assert oom.calls == [4, 2, 1, 1, 2, 1, 1]
    assert got.seeds == [100, 101, 102, 103]
    for a, b in zip(expected.images, got.images):
        assert np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), atol=2), "split changed pixels"


def test_oom_on_a_single_image_raises_and_the_pipeline_keeps_serving(pipe):
    with pytest.raises(torch.cuda.OutOfMemoryError) as failure:
        generate(OutOfMemoryAbove(pipe, limit=0), request(2))
    assert "ran out of memory" in friendly_reason(type(failure.value))
    assert len(generate(pipe, request(1)).images) == 1
