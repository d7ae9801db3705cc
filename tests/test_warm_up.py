"""A compiled worker warms every shape it will serve before it registers: no user waits for a
compile. Runs torch.compile on the CPU inductor backend with a tiny pipeline."""

from __future__ import annotations

import pytest
from torch._dynamo.utils import counters

from core.jobs import JobRequest
from settings.catalog import FastMode, ModelEntry
from settings.config import Settings
from worker.generate import generate_batch
from worker.main import load_pipelines, warm_up_plan, warm_up_shapes

TINY = ModelEntry(key="tiny", source="unused", pipeline="StableDiffusionPipeline", native_size=64)


def test_eager_worker_warms_one_small_run():
    assert warm_up_shapes(Settings(_env_file=None), TINY) == [(64, 1)]


def test_compiled_worker_warms_every_images_per_call_count_and_extra_sizes():
    settings = Settings(_env_file=None, compile="reduce-overhead", max_batch_images=3, max_count=4,
                        compile_sizes=[128, 64])
    # A lone job may hold max_count images even when that is above the batch limit.
    assert warm_up_shapes(settings, TINY) == [(64, n) for n in range(1, 5)] + [(128, n) for n in range(1, 5)]
    pinned = Settings(_env_file=None, compile="default", compile_batch_sizes=[1, 8])
    assert warm_up_shapes(pinned, TINY) == [(64, 1), (64, 8)]


SOLVER = FastMode(scheduler="DPMSolverMultistepScheduler", steps=12, guidance=None, max_guidance=None)
LCM = FastMode(adapter="latent-consistency/lcm-lora-sdv1-5")


def test_fast_mode_warms_every_shape_only_when_it_runs_other_graphs():
    settings = Settings(_env_file=None, compile="reduce-overhead", max_batch_images=3, max_count=3)
    shapes = [(64, n) for n in (1, 2, 3)]
    standard = [(size, n, "standard", 7.5) for size, n in shapes]
    # bk-sdm-small's: a solver at fewer steps, CFG kept: the standard graphs, one fast call.
    solver = TINY.model_copy(update={"fast": SOLVER})
    assert warm_up_plan(settings, solver) == standard + [(64, 1, "fast", 7.5)]
    # An LCM adapter switched on: other graphs at every shape.
    lcm = TINY.model_copy(update={"fast": LCM})
    assert warm_up_plan(settings, lcm) == standard + [(size, n, "fast", 1.0) for size, n in shapes]
    # No adapter but guidance 1 (no CFG): half the UNet batch, another shape each time.
    unguided = TINY.model_copy(update={"fast": SOLVER.model_copy(update={"guidance": 1.0})})
    assert warm_up_plan(settings, unguided) == standard + [(size, n, "fast", 1.0) for size, n in shapes]
    assert warm_up_plan(settings, TINY) == standard  # no fast mode


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow  # torch.compile on CPU: minutes
def test_batched_jobs_after_a_compiled_warm_up_compile_nothing(tiny_model_dir):
    settings = Settings(_env_file=None, device="cpu", compile="default", max_batch_images=3, max_count=2,
                        worker_models=["tiny"],
                        models={"tiny": {"source": str(tiny_model_dir), "pipeline": "StableDiffusionPipeline",
                                         "native_size": 64, "variant": None}})
    before = graphs_compiled()
    pipelines = load_pipelines(settings)
    assert graphs_compiled() > before  # the warm-up did compile

    warmed = graphs_compiled()
    jobs = [JobRequest(job_id=f"j{i}", model="tiny", prompt=f"cat {i}", steps=3, guidance=7.5, seed=i,
                       size=64, count=count) for i, count in enumerate([2, 1])]
    generations = generate_batch(pipelines.get("tiny"), jobs)  # three images in one call
    assert [len(g.images) for g in generations] == [2, 1]
    assert graphs_compiled() == warmed


@pytest.mark.slow  # torch.compile on CPU
def test_fast_jobs_of_a_solver_model_compile_nothing_after_one_fast_warm_up_call(tiny_model_dir):
    """The single fast-mode warm-up call of a solver model (warm_up_plan) leaves no fast job of
    any warmed count to compile: the standard calls warmed its graphs."""
    settings = Settings(_env_file=None, device="cpu", compile="default", max_batch_images=3, max_count=3,
                        worker_models=["tiny"],
                        models={"tiny": {"source": str(tiny_model_dir), "pipeline": "StableDiffusionPipeline",
                                         "native_size": 64, "variant": None,
                                         "fast": {"scheduler": "DPMSolverMultistepScheduler", "steps": 4,
                                                  "guidance": None, "max_guidance": None}}})
    pipelines = load_pipelines(settings)
    entry = pipelines.entries["tiny"]
    assert [call[2] for call in warm_up_plan(settings, entry)].count("fast") == 1
    warmed = graphs_compiled()
    for count in (1, 2, 3):
        fast = JobRequest(job_id="f", model="tiny", prompt="cat", steps=4, guidance=7.5, seed=1, size=64,
                          count=count, quality="fast")
        generation = generate_batch(pipelines.get("tiny"), [fast], fast=entry.fast)[0]
        assert len(generation.images) == count and generation.scheduler == "DPMSolverMultistepScheduler"
    assert graphs_compiled() == warmed


@pytest.mark.slow  # Dynamo traces of the tiny UNet: ~12 s each
@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_one_unet_graph_serves_every_batch_size(tiny_model_dir, monkeypatch, dynamic_batch):
    """IMAGINE_COMPILE_DYNAMIC_BATCH: the compiled UNet's first call (count 1: a batch of 2 with
    classifier-free guidance) already compiles the graph counts 2 and 3 run. torch's default
    compiles it only at the second count, after a graph specialised to the first: one more
    trace at every start. Dynamo's own graph count, on its eager backend (inductor's compile is
    the slow tests'); the images stay the same."""
    import numpy as np
    import torch

    from settings.catalog import ModelEntry
    from worker.optimize import SpeedOptions, optimize
    from worker.pipelines import CPU, load_pipeline

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, **{**kwargs, "backend": "eager"}))
    torch._dynamo.reset()
    entry = ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline", variant=None)
    plain = load_pipeline(entry, CPU, torch.float32)
    pipe = optimize(load_pipeline(entry, CPU, torch.float32),
                    SpeedOptions(compile="default", fused_step=False, dynamic_batch=dynamic_batch))
    graphs = []
    for count in (1, 2, 3):
        job = JobRequest(job_id="d", model="tiny", prompt="cat", steps=2, guidance=7.5, seed=count, size=64,
                         count=count)
        before = graphs_compiled()
        images = generate_batch(pipe, [job])[0].images
        graphs.append(graphs_compiled() - before)
        for a, b in zip(images, generate_batch(plain, [job])[0].images, strict=True):
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    # count 1: UNet + VAE decode; count 2: the VAE's dynamic graph (a batch of one specialises),
    # and, by torch's default, the UNet's too; count 3: nothing new.
    assert graphs == ([2, 1, 0] if dynamic_batch else [2, 2, 0])
