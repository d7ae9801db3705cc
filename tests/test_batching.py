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

from core.jobs import Delivery, JobRequest, queue_name
from core.queue import JobQueue
from settings.catalog import ModelEntry
from settings.config import Settings
from tests.support.fake_discord import snowflake
from tests.support.stack import start_worker, wait_for
from worker.generate import generate, generate_batch
from worker.pipelines import ResidentPipelines, load_pipeline, weight_bytes

CPU = torch.device("cpu")


def request(job_id: str = "j", **fields) -> JobRequest:
    base = dict(job_id=job_id, model="tiny", prompt="an orange cat", negative_prompt="blurry",
                steps=2, guidance=7.5, seed=3, size=64)
    return JobRequest(**{**base, **fields})


def as_array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def runtime_for(pipelines: ResidentPipelines, redis: Redis, prefix: str, settings: Settings | None = None):
    """A worker runtime on the test's Redis, as ``worker.main`` builds it."""
    from worker.outcomes import Outcomes
    from worker.runtime import WorkerRuntime

    settings = settings or Settings(_env_file=None, queue_prefix=prefix)
    return WorkerRuntime(pipelines=pipelines, redis=redis, outcomes=Outcomes(redis, prefix, 600), settings=settings)


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
    with pytest.raises(ValueError, match="share model, size, steps, guidance, quality and source"):
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
    # The model's only worker: recycles anyway (by default it waits for a peer: test_recycling).
    worker = start_worker({**env, "IMAGINE_QUEUE_PREFIX": prefix, "IMAGINE_MAX_BATCH_IMAGES": "8",
                           "IMAGINE_RECYCLE_NEEDS_PEER": "false"},
                          tmp_path / "worker.log", "--burst")
    try:
        worker.popen.wait(120)
    finally:
        worker.stop()
    return requests, worker


@pytest.mark.e2e  # real worker processes
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
    from worker.runtime import install_runtime

    redis = Redis.from_url(redis_server.url)
    prefix = f"pref{snowflake()[-6:]}"
    resident = ResidentPipelines(device=CPU, dtype=torch.float32, on_device=OrderedDict(hot=1))
    install_runtime(runtime_for(resident, redis, prefix))
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


@pytest.mark.e2e  # real worker processes
def test_batch_companions_show_the_step_bar_too(env, redis_server, fake_discord, tmp_path):
    requests, worker = queue_then_drain(env, redis_server, tmp_path, "batchbar",
                                        {"lead": (20, 3), "companion": (20, 4)})
    companion = fake_discord.messages("edit", requests["companion"].delivery.interaction_token)
    bars = [e for e in companion if (e.payload.get("content") or "").startswith("🖌️")]
    assert bars, worker.log()
    assert companion[-1].payload.get("embeds"), "the result is the last edit"


def test_oldest_starving_model_first_whatever_the_configured_order(redis_server):
    from collections import OrderedDict

    from worker.rq_worker import ImagineQueue, ImagineWorker
    from worker.runtime import install_runtime

    redis = Redis.from_url(redis_server.url)
    prefix = f"old:{snowflake()[-6:]}"  # a prefix with a colon, too
    install_runtime(runtime_for(ResidentPipelines(device=CPU, dtype=torch.float32, on_device=OrderedDict(a=1)),
                                redis, prefix))
    queues = [ImagineQueue(queue_name(m, prefix), connection=redis, serializer=JSONSerializer) for m in ("a", "b")]
    worker = ImagineWorker(queues, connection=redis, serializer=JSONSerializer, starvation_s=20)
    jobs = JobQueue(redis, Settings(redis_url=redis_server.url, queue_prefix=prefix, _env_file=None))
    jobs.submit(request(f"{snowflake()}", model="a", created_at=time.time() - 25))
    jobs.submit(request(f"{snowflake()}", model="b", created_at=time.time() - 500))
    assert [q.name.rsplit(":", 1)[1] for q in sorted(worker.queues, key=worker._queue_priority)] == ["b", "a"]


@pytest.mark.e2e  # real worker processes
def test_a_batch_owns_its_companions_until_each_is_done_even_through_a_crash(
        env, redis_server, fake_discord, tmp_path):
    """Companions waiting for their turn are leased like the running job: another worker's
    clean-up leaves them alone, a cancel is refused, and when the worker dies mid-batch every
    member comes back within a lease and is posted exactly once."""
    from core.queue import Cancelling, CannotCancel
    from worker.rq_worker import ImagineQueue, ImagineWorker

    prefix = f"own{snowflake()[-6:]}"
    redis = Redis.from_url(redis_server.url)
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, _env_file=None)
    jobs = JobQueue(redis, settings)
    batch = [request(f"{prefix}-{i}", steps=40, size=192, seed=i, delivery=Delivery(
        application_id=1, interaction_id=int(snowflake()), interaction_token=f"tok-own-{i}-{snowflake()}",
        user_id=5, guild_id=1)) for i in range(3)]
    for member in batch:
        jobs.submit(member)
    fast = {"IMAGINE_QUEUE_PREFIX": prefix, "IMAGINE_MAX_BATCH_IMAGES": "8", "IMAGINE_HEARTBEAT_S": "1",
            "IMAGINE_MAINTENANCE_INTERVAL_S": "1", "IMAGINE_IDLE_POLL_S": "2"}
    doomed = start_worker({**env, **fast}, tmp_path / "doomed.log", new_session=True)
    try:
        def statuses():
            return [Job.fetch(m.job_id, connection=redis, serializer=JSONSerializer).get_status() for m in batch]
        wait_for(lambda: all(s == "started" for s in statuses()), 60, what="the whole batch leased")
        queue = ImagineQueue(queue_name("tiny", prefix), connection=redis, serializer=JSONSerializer)
        for member in batch[1:]:  # as if they had sat in RQ's intermediate list for minutes
            redis.set(queue.intermediate_queue.get_first_seen_key(member.job_id), time.time() - 300)
        queue.intermediate_queue.cleanup(ImagineWorker([queue], connection=redis, serializer=JSONSerializer), queue)
        assert queue.count == 0 and all(s == "started" for s in statuses()), "another worker took them back"
        with pytest.raises(CannotCancel):
            Cancelling(jobs, release_job=lambda job: None).cancel(batch[2].job_id, 5, 1, False)
    finally:
        doomed.kill_group()
    survivor = start_worker({**env, **fast}, tmp_path / "survivor.log")
    try:
        tokens = [m.delivery.interaction_token for m in batch]
        wait_for(lambda: all(fake_discord.results(t) for t in tokens), 240, what="each member's result")
        # A second post could only come from another run of a member: over once all are finished.
        wait_for(lambda: statuses() == ["finished"] * 3, 60, what="every member finished")
        assert [len(fake_discord.results(m.delivery.interaction_token)) for m in batch] == [1, 1, 1]
        retries = [Job.fetch(m.job_id, connection=redis, serializer=JSONSerializer).retries_left for m in batch]
        assert retries == [1, 1, 1], "each member is recovered once, not by two clean-ups"
    finally:
        survivor.stop()



def test_failed_web_jobs_are_noted_once_not_reported_every_sweep(redis_server, caplog):
    """A web job (no Discord delivery) has nobody to tell; the sweep notes that once and never
    claims to have told anyone."""
    from rq import Queue

    from worker.failures import Reporter, report_untold_failures
    from worker.outcomes import Outcomes

    prefix = f"web{snowflake()[-6:]}"
    redis = Redis.from_url(redis_server.url)
    queue = Queue(queue_name("tiny", prefix), connection=redis, serializer=JSONSerializer)
    job = queue.enqueue("worker.tasks.run_imagine", request(f"{prefix}-w").model_dump(mode="json"))
    job.set_status("failed")
    queue.failed_job_registry.add(job, ttl=600, exc_string="boom")
    reporter = Reporter(Outcomes(redis, prefix, 600))
    with caplog.at_level("WARNING"):
        assert report_untold_failures(queue, reporter, 600) == 0
        assert report_untold_failures(queue, reporter, 600) == 0
    assert "told now" not in caplog.text
    assert reporter.outcomes.untold([job.id]) == []


@pytest.mark.e2e  # real worker processes
def test_max_jobs_counts_jobs_not_batches(env, redis_server, tmp_path):
    """Recycling a worker after N jobs (--max-jobs) stays exact with batching: it claims no more
    companions than the jobs it has left, and exits after the Nth."""
    prefix = f"max{snowflake()[-6:]}"
    redis = Redis.from_url(redis_server.url)
    jobs = JobQueue(redis, Settings(redis_url=redis_server.url, queue_prefix=prefix, _env_file=None))
    for i in range(5):
        jobs.submit(request(f"{prefix}-{i}", seed=i))
    # The model's only worker: recycles anyway (by default it waits for a peer: test_recycling).
    worker = start_worker({**env, "IMAGINE_QUEUE_PREFIX": prefix, "IMAGINE_MAX_BATCH_IMAGES": "8",
                           "IMAGINE_RECYCLE_NEEDS_PEER": "false"},
                          tmp_path / "worker.log", "--max-jobs", "3")
    try:
        assert worker.popen.wait(120) == 0, worker.log()
    finally:
        worker.stop()
    done = [Job.fetch(f"{prefix}-{i}", connection=redis, serializer=JSONSerializer).get_status() for i in range(5)]
    assert done == ["finished"] * 3 + ["queued"] * 2


def test_a_companions_preview_shows_its_own_image_never_the_leads(tiny_model_dir, redis_server, monkeypatch):
    """Jobs of different users share a pipeline call; each one's progress preview must come from
    its own latents."""
    import worker.progress as progress
    from worker.batching import images_for

    resident = ResidentPipelines(device=CPU, dtype=torch.float32)
    resident.load(ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline"))
    settings = Settings(_env_file=None, progress_preview=True, progress_interval_s=0.01,
                        queue_prefix=f"prev{snowflake()[-6:]}")
    runtime = runtime_for(resident, Redis.from_url(redis_server.url), settings.queue_prefix, settings)
    previewed: list[torch.Tensor] = []
    real_preview = progress.latent_preview
    monkeypatch.setattr(progress, "latent_preview", lambda latents, xl: (previewed.append(latents.clone()),
                                                                         real_preview(latents, xl))[1])
    monkeypatch.setattr(progress, "edit_original", lambda *args, **kwargs: None)

    def job(name: str, prompt: str, seed: int) -> JobRequest:
        return request(name, prompt=prompt, seed=seed, steps=3, delivery=Delivery(
            application_id=1, interaction_id=int(snowflake()), interaction_token=f"t-{name}-{snowflake()}",
            user_id=seed))

    lead, companion = job("lead", "a red fox", 1), job("comp", "a blue whale", 999)
    runtime.batches.companions[lead.job_id] = [companion]
    images_for(runtime, lead, lambda step, total, latents: time.sleep(0.05))  # steps outlast the 0.01 s interval

    def own_latents(r: JobRequest) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        generate(resident.get("tiny"), r, lambda step, total, latents: seen.append(latents[:1].clone()))
        return seen

    companions_own, leads_own = own_latents(companion), own_latents(lead)
    assert previewed, "the companion's reporter sent previews"
    for latents in previewed:
        assert any(torch.allclose(latents, own, atol=1e-4) for own in companions_own)
        assert not any(torch.allclose(latents, own, atol=1e-4) for own in leads_own)


def test_a_malformed_job_plans_no_batch_instead_of_stopping_the_worker(redis_server):
    from worker.batching import BatchPlan

    redis = Redis.from_url(redis_server.url)
    bad = Job.create("worker.tasks.run_imagine", args=[{"prompt": "no model"}], connection=redis,
                     serializer=JSONSerializer)
    good = Job.create("worker.tasks.run_imagine", args=[request("ok").model_dump(mode="json")],
                      connection=redis, serializer=JSONSerializer)
    plan = BatchPlan()
    plan.plan(bad, [good], 8)  # the bad lead fails through RQ; the good one runs alone
    plan.plan(good, [bad], 8)  # a bad companion is left out
    assert plan.take_companions(bad.id) == [] and plan.take_companions(good.id) == []


def test_previews_pause_while_a_batch_runs_in_parts_after_running_out_of_memory():
    from worker.batching import _from_image

    seen = []
    callback = _from_image(2, 4, lambda step, total, latents: seen.append(latents))
    callback(1, 10, torch.arange(4).view(4, 1))  # the whole batch: this job's images start at 2
    callback(2, 10, torch.arange(2).view(2, 1))  # one half after a split: not this job's layout
    assert seen[0].flatten().tolist() == [2, 3] and seen[1] is None


def test_a_job_failed_without_its_callback_frees_its_users_slot(redis_server):
    """RQ fails a job stuck in a queue's intermediate list (its worker died between dequeue and
    lease, retries spent) without running ``on_failure``: the failed-job sweep that tells its
    user must free its slot too, or it counts against the user until it times out."""
    from rq import Queue

    from core.jobs import ACTIVE_KEY_META
    from worker.failures import Reporter, report_untold_failures
    from worker.outcomes import Outcomes

    prefix = f"slot{snowflake()[-6:]}"
    redis = Redis.from_url(redis_server.url)
    active = f"{prefix}:active:web:client"
    queue = Queue(queue_name("tiny", prefix), connection=redis, serializer=JSONSerializer)
    job = queue.enqueue("worker.tasks.run_imagine", request(f"{prefix}-w").model_dump(mode="json"),
                        meta={ACTIVE_KEY_META: active})
    redis.zadd(active, {job.id: time.time() + 3600})
    job.set_status("failed")
    queue.failed_job_registry.add(job, ttl=600, exc_string="Job was stuck in intermediate queue.")
    report_untold_failures(queue, Reporter(Outcomes(redis, prefix, 600)), 600)
    assert redis.zscore(active, job.id) is None


def test_a_web_companion_keeps_its_step_count_for_its_page(tiny_model_dir, redis_server, monkeypatch):
    """A web job made in another job's pipeline call: its page reads the step count from the
    job's RQ meta, as for a job run on its own."""
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from core.jobs import PROGRESS_META
    from worker.batching import images_for

    resident = ResidentPipelines(device=CPU, dtype=torch.float32)
    resident.load(ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline"))
    redis, prefix = Redis.from_url(redis_server.url), f"webc{snowflake()[-6:]}"
    runtime = runtime_for(resident, redis, prefix)
    lead, companion = request(f"lead-{prefix}", steps=3), request(f"web-{prefix}", steps=3, store_images=True)
    Queue(f"{prefix}:tiny", connection=redis, serializer=JSONSerializer).enqueue(
        "worker.tasks.run_imagine", companion.model_dump(mode="json"), job_id=companion.job_id)
    seen = []
    real_save = Job.save_meta
    monkeypatch.setattr(Job, "save_meta", lambda job: (seen.append(dict(job.meta.get(PROGRESS_META, {}))),
                                                       real_save(job))[1])
    runtime.batches.companions[lead.job_id] = [companion]
    images_for(runtime, lead, None)
    assert seen and seen[-1] == {"step": 3, "steps": 3}
    stored = Job.fetch(companion.job_id, connection=redis, serializer=JSONSerializer).meta[PROGRESS_META]
    assert stored == {"step": 3, "steps": 3}
