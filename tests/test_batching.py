"""Batching compatible jobs: one pipeline call, the same pixels as alone, each job posted
separately; and parking models in host RAM under a memory budget."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from bot.queue import JobQueue
from settings.catalog import ModelEntry
from settings.config import Settings
from settings.jobs import Delivery, JobRequest, queue_name
from worker.generate import generate, generate_batch
from worker.pipelines import ResidentPipelines, load_pipeline, weight_bytes
from tests.fake_discord import snowflake
from tests.stack import start_worker

CPU = torch.device("cpu")


def request(job_id: str = "j", **fields) -> JobRequest:
    base = dict(job_id=job_id, model="tiny", prompt="an orange cat", negative_prompt="blurry",
                steps=2, guidance=7.5, seed=3, size=64)
    return JobRequest(**{**base, **fields})


def as_array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    entry = ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline")
    return load_pipeline(entry, CPU, torch.float32)


def test_batch_of_different_prompts_matches_each_run_alone(pipe):
    requests = [request("a", prompt="a red fox", seed=1), request("b", prompt="a blue whale", seed=2, count=2),
                request("c", prompt="a green frog", negative_prompt="", seed=9)]
    batched = generate_batch(pipe, requests)
    assert [g.batch_images for g in batched] == [4, 4, 4]
    for req, generation in zip(requests, batched):
        alone = generate(pipe, req)
        assert generation.seeds == alone.seeds
        for a, b in zip(generation.images, alone.images):
            assert np.abs(as_array(a) - as_array(b)).max() <= 2


def test_incompatible_requests_are_refused_in_one_batch(pipe):
    with pytest.raises(ValueError, match="share model, size, steps and guidance"):
        generate_batch(pipe, [request("a"), request("b", steps=3)])


def test_budget_parks_least_recently_used_model(tiny_model_dir, tiny_xl_model_dir):
    sd = ModelEntry(key="sd", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline")
    xl = ModelEntry(key="xl", source=str(tiny_xl_model_dir), pipeline="StableDiffusionXLPipeline")
    probe = load_pipeline(xl, CPU, torch.float32)
    resident = ResidentPipelines(device=CPU, dtype=torch.float32, budget_bytes=weight_bytes(probe) + 1)
    resident.load(sd)
    resident.load(xl)
    assert resident.resident_keys() == []  # everything waits in host RAM until needed
    resident.get("sd")
    resident.get("xl")  # both do not fit: sd is parked
    assert resident.resident_keys() == ["xl"]
    image = generate(resident.get("sd"), request(model="sd")).images[0]
    assert resident.resident_keys() == ["sd"] and as_array(image).std() > 1


def queue_then_drain(env, redis_server, tmp_path, name: str, specs: dict[str, tuple[int, int]]):
    """Queue jobs (name → (steps, seed)) while no worker runs, then let one burst worker with
    batching drain them. Returns the requests by name and the finished worker process."""
    prefix = f"{name}{snowflake()[-6:]}"
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, _env_file=None)
    queue = JobQueue(Redis.from_url(redis_server.url), settings)
    requests = {}
    for job, (steps, seed) in specs.items():
        requests[job] = request(f"{prefix}-{job}", steps=steps, seed=seed, delivery=Delivery(
            application_id=1, interaction_id=int(snowflake()),
            interaction_token=f"tok-{name}-{job}-{snowflake()}", user_id=5))
        queue.submit(requests[job])
    worker = start_worker({**env, "IMAGINE_QUEUE_PREFIX": prefix, "IMAGINE_MAX_BATCH_IMAGES": "8"},
                          tmp_path / "worker.log", "--burst")
    try:
        worker.popen.wait(120)
    finally:
        worker.stop()
    return requests, worker


def test_worker_batches_queued_compatible_jobs(env, redis_server, fake_discord, pipe, tmp_path):
    """Jobs queued while no worker runs: A,B,C share settings, D differs, E matches A again.
    Expected pipeline calls: [A,B,C] then [D] then [E] — never reordered past D."""
    specs = {"a": (2, 11), "b": (2, 12), "c": (2, 13), "d": (3, 14), "e": (2, 15)}
    requests, worker = queue_then_drain(env, redis_server, tmp_path, "batch", specs)
    redis = Redis.from_url(redis_server.url)
    results = {name: Job.fetch(r.job_id, connection=redis, serializer=JSONSerializer).latest_result().return_value
               for name, r in requests.items()}
    assert {n: r["batch_images"] for n, r in results.items()} == {"a": 3, "b": 3, "c": 3, "d": 1, "e": 1}, worker.log()
    for name, req in requests.items():
        post = fake_discord.results(req.delivery.interaction_token)
        assert len(post) == 1, f"{name} posted {len(post)} times"
        posted = as_array(Image.open(io.BytesIO(post[0].files[0][1])).convert("RGB"))
        alone = as_array(generate(pipe, req).images[0])
        assert np.abs(posted - alone).max() <= 2


def test_worker_prefers_models_on_the_gpu_without_starving_others(redis_server):
    from collections import OrderedDict

    from worker.rq_worker import ImagineQueue, ImagineWorker
    from worker.tasks import WorkerRuntime, install_runtime

    redis = Redis.from_url(redis_server.url)
    prefix = f"pref{snowflake()[-6:]}"
    resident = ResidentPipelines(device=CPU, dtype=torch.float32, on_device=OrderedDict(hot=1))
    install_runtime(WorkerRuntime(pipelines=resident))
    queues = [ImagineQueue(queue_name(m, prefix), connection=redis, serializer=JSONSerializer)
              for m in ("cold", "hot")]
    worker = ImagineWorker(queues, connection=redis, serializer=JSONSerializer, starvation_s=20)
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, _env_file=None)
    jobs = JobQueue(redis, settings)

    def order() -> list[str]:
        return [q.name.split(":")[1] for q in sorted(worker.queues, key=worker._queue_priority)]

    jobs.submit(request(f"{prefix}-c1", model="cold"))
    jobs.submit(request(f"{prefix}-h1", model="hot"))
    assert order() == ["hot", "cold"]  # no swap while the held model has work
    queues[0].empty()
    jobs.submit(request(f"{prefix}-c2", model="cold", created_at=time.time() - 30))
    assert order() == ["cold", "hot"]  # waited past starvation_s: served even if it costs a swap


def test_batch_companions_show_the_step_bar_too(env, redis_server, fake_discord, tmp_path):
    requests, worker = queue_then_drain(env, redis_server, tmp_path, "batchbar",
                                        {"lead": (20, 3), "companion": (20, 4)})
    companion = fake_discord.messages("edit", requests["companion"].delivery.interaction_token)
    bars = [e for e in companion if (e.payload.get("content") or "").startswith("🖌️")]
    assert bars, worker.log()
    assert companion[-1].payload.get("embeds"), "the result is the last edit"
