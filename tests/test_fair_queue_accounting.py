"""The fair queue's accounting (issue 13) and the worker's stored failures (issue 18): a server's
share is its queued jobs, however many members queue them; jobs that leave without running
(cancel, expiry) or a refused duplicate hold no share and no place; a stored failure is scrubbed
of every configured secret. Real redis-server, no GPU, fast."""

from __future__ import annotations

import pytest
from redis import Redis

from core.admission import Requester, admit, enqueue_admitted
from core.expiry import expire_stale_jobs
from core.jobs import Delivery, JobRequest
from core.policy_store import PolicyStore
from core.queue import Cancelling, JobQueue, QueueBusy
from core.validation import ImagineOptions
from settings.config import Settings
from tests.support.fake_discord import snowflake
from tests.test_expiry import queued_ago


def settings_for(redis_server, **extra) -> Settings:
    return Settings(redis_url=redis_server.url, queue_prefix=f"aq{snowflake()[-7:]}", default_model="tiny",
                    min_size=64, models={"tiny": {"source": "-", "pipeline": "StableDiffusionPipeline",
                                                  "native_size": 64, "default_steps": 1}},
                    _env_file=None, **extra)


def request(job_id: str, guild: int | None, user: int) -> JobRequest:
    return JobRequest(job_id=job_id, model="tiny", prompt="a lake", steps=2, guidance=7, seed=1, size=64,
                      delivery=Delivery(application_id=1, interaction_id=1, guild_id=guild, user_id=user))


def small_queue(redis_server) -> JobQueue:
    """Per-model depth 20, per-tenant share 25 %: a server may hold 5 jobs of the model."""
    return JobQueue(Redis.from_url(redis_server.url), settings_for(redis_server, queue_max_depth=20,
                                                                   tenant_max_share=0.25))


# -- issue 13: the per-tenant maximum share ----------------------------------------------------
def test_a_servers_share_counts_its_jobs_not_twice_its_members(redis_server):
    """Three members with one job each are three jobs of the server, as one member's three jobs
    are (a backlog read from finish tags once counted 2k - 1 for k members with one job each,
    refusing a big server at half its share)."""
    jobs = small_queue(redis_server)
    run = snowflake()[-8:]
    for member in range(3):
        jobs.submit(request(f"{run}-m{member}", guild=1, user=100 + member))
    # the fourth member of a server with 3 jobs waiting (share: 5) is not refused
    jobs.admission_outlook(request(f"{run}-m3", guild=1, user=103))


def test_a_server_of_many_members_may_fill_its_default_share(redis_server):
    """Defaults (depth 300, share 25 %): a server may hold 75 jobs of a model, whoever asks."""
    jobs = JobQueue(Redis.from_url(redis_server.url), settings_for(redis_server))
    run = snowflake()[-8:]
    for member in range(60):
        try:
            jobs.admission_outlook(request(f"{run}-m{member}", guild=1, user=1000 + member))
        except QueueBusy as busy:
            pytest.fail(f"refused with {member} jobs of the server waiting (share: 75): {busy}")
        jobs.submit(request(f"{run}-m{member}", guild=1, user=1000 + member))


# -- issue 13: cancel and expiry must not leave a server locked out ------------------------------
@pytest.mark.parametrize("how", ["cancel", "expiry"])
def test_jobs_that_left_the_queue_do_not_keep_their_server_busy(redis_server, how):
    """A server whose jobs were all cancelled (or expired) has nothing waiting: its next job is
    not refused with "this server already has about N images waiting", nor placed behind the
    jobs it no longer has (finish tags left where removed jobs put them would last until virtual
    time passed them: thousands of other jobs in a queue that never empties)."""
    jobs = small_queue(redis_server)
    run = snowflake()[-8:]
    jobs.submit(request(f"{run}-other", guild=2, user=20))  # another server keeps the queue non-empty
    for i in range(5):
        jobs.submit(request(f"{run}-a{i}", guild=1, user=10))
    if how == "cancel":
        cancelling = Cancelling(jobs, lambda job: None)
        for i in range(5):
            cancelling.cancel(f"{run}-a{i}", user_id=10, guild_id=1, is_admin=False)
    else:
        for i in range(5):
            queued_ago(jobs.redis, f"{run}-a{i}", 10_000)
        policies = PolicyStore(jobs.redis, jobs.settings.queue_prefix)
        assert len(expire_stale_jobs(jobs, policies, ["tiny"], jobs.settings.queue_ttl_s)) == 5
    assert jobs.queue("tiny").get_job_ids() == [f"{run}-other"]
    outlook = jobs.admission_outlook(request(f"{run}-b0", guild=1, user=11))
    assert outlook.position <= 2


def test_models_does_not_count_a_server_whose_jobs_were_all_cancelled(redis_server):
    """/models "shows ... how many tenants are waiting": a server whose jobs were all cancelled
    is not waiting."""
    jobs = small_queue(redis_server)
    run = snowflake()[-8:]
    jobs.submit(request(f"{run}-other", guild=2, user=20))
    for i in range(5):
        jobs.submit(request(f"{run}-a{i}", guild=1, user=10))
    cancelling = Cancelling(jobs, lambda job: None)
    for i in range(5):
        cancelling.cancel(f"{run}-a{i}", user_id=10, guild_id=1, is_admin=False)
    assert jobs.tenants_waiting(["tiny"]) == {"tiny": 1}  # only server 2 has a job waiting


def test_one_ordinary_member_cannot_lock_their_server_out_by_queueing_and_cancelling(redis_server):
    """Within the default per-user limits (3 active, 10 per minute), one member queues and cancels
    five jobs; another member of the same server, with nothing of the server waiting, is admitted."""
    jobs = small_queue(redis_server)
    redis, settings = jobs.redis, jobs.settings
    policies = PolicyStore(redis, settings.queue_prefix, jobs.job_lifetime_s())
    cancelling = Cancelling(jobs, policies.release_job)
    run = snowflake()[-8:]
    jobs.submit(request(f"{run}-other", guild=2, user=20))

    def ask(job_id: str, user: int):
        requester = Requester(user_id=user, guild_id=1, channel_id=None)
        admitted = admit(ImagineOptions(prompt="a lake"), requester, job_id=job_id, settings=settings,
                         catalog=settings.catalog(), policies=policies, jobs=jobs,
                         delivery=Delivery(application_id=1, interaction_id=1, guild_id=1, user_id=user))
        enqueue_admitted(admitted, jobs, policies)

    for batch in ([0, 1, 2], [3, 4]):  # never more than 3 active, 5 commands in all
        for i in batch:
            ask(f"{run}-x{i}", 10)
        for i in batch:
            cancelling.cancel(f"{run}-x{i}", user_id=10, guild_id=1, is_admin=False)
    assert jobs.queue("tiny").get_job_ids() == [f"{run}-other"]
    ask(f"{run}-victim", 11)  # not "this server already has about 5 images waiting"


def test_a_refused_duplicate_enqueue_does_not_count_against_its_server(redis_server):
    """A second enqueue of the same job id (a gateway replay past its claim, or redis-py's retry of
    the insert script after a timed-out reply) is refused as AlreadyQueued and changes nothing:
    after one job and four duplicates the server (share: 5 jobs) is not "busy"."""
    from core.queue import AlreadyQueued

    jobs = small_queue(redis_server)
    run = snowflake()[-8:]
    jobs.submit(request(f"{run}-other", guild=2, user=20))
    jobs.submit(request(f"{run}-a", guild=1, user=10))
    for _ in range(4):
        with pytest.raises(AlreadyQueued):
            jobs.submit(request(f"{run}-a", guild=1, user=10))
    assert jobs.queue("tiny").get_job_ids() == [f"{run}-other", f"{run}-a"]
    jobs.admission_outlook(request(f"{run}-b", guild=1, user=11))


# -- issue 18: every secret is scrubbed from what RQ stores --------------------------------------
def test_hf_token_and_redis_password_are_scrubbed_from_stored_failures(redis_server):
    """"A Hugging Face token, when set, is documented and scrubbed like the others": in the
    failure text RQ keeps for a week (failed registry, results) as in log lines."""
    torch = pytest.importorskip("torch")
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from worker.outcomes import Outcomes
    from worker.pipelines import ResidentPipelines
    from worker.rq_worker import ImagineQueue, ImagineWorker
    from worker.runtime import WorkerRuntime, install_runtime, installed_runtime

    hf_token, password = "hf_AuditSecretToken0123456789abcdef", "audit-redis-password-0123"
    settings = settings_for(redis_server, hf_token=hf_token, redis_password=password)
    redis = Redis.from_url(redis_server.url)
    jobs = JobQueue(redis, settings)
    job_id = f"aq-{snowflake()[-8:]}"
    jobs.submit(request(job_id, guild=1, user=10))
    before = installed_runtime()
    install_runtime(WorkerRuntime(pipelines=ResidentPipelines(device=torch.device("cpu"), dtype=torch.float32),
                                  redis=redis, outcomes=Outcomes(redis, settings.queue_prefix, 3600),
                                  settings=settings))
    try:
        queue = ImagineQueue(jobs.queue("tiny").name, connection=redis, serializer=JSONSerializer)
        worker = ImagineWorker([queue], connection=redis, serializer=JSONSerializer)
        job = queue.fetch_job(job_id)
        job.retries_left = 0
        job.save()
        worker.handle_job_failure(job, queue, exc_string=(
            f"HTTPError: 401 for https://huggingface.co/api/models (Authorization: Bearer {hf_token}); "
            f"redis AUTH {password} rejected"))
    finally:
        install_runtime(before)
    stored = Job.fetch(job_id, connection=redis, serializer=JSONSerializer).latest_result().exc_string
    assert "HTTPError" in stored
    assert hf_token not in stored and password not in stored, stored


def _backlog(jobs: JobQueue, guild: int, user: int) -> float:
    return jobs.queue("tiny").peek(str(guild), str(user)).tenant_backlog


def test_every_way_out_of_the_list_lowers_the_servers_count(redis_server):
    """Taken by a worker (the lease pipeline), removed in a pipeline or directly, and found gone
    by maintenance: each lowers the server's count once, and a second removal of the same job
    changes nothing."""
    from rq.job import Job

    jobs = small_queue(redis_server)
    queue, run = jobs.queue("tiny"), snowflake()[-8:]
    for i in range(5):
        jobs.submit(request(f"{run}-a{i}", guild=1, user=10 + i % 2))
    assert _backlog(jobs, 1, 99) == 5 and jobs.tenants_waiting(["tiny"]) == {"tiny": 1}
    with jobs.redis.pipeline() as pipe:  # a worker's lease
        pipe.lrem(queue.key, 1, f"{run}-a0")
        queue.taken([f"{run}-a0"], pipe)
        pipe.execute()
    assert _backlog(jobs, 1, 99) == 4
    with jobs.redis.pipeline() as pipe:  # RQ's remove-with-pipeline path (as its registries call it)
        queue.remove(f"{run}-a1", pipeline=pipe)
        pipe.execute()
    assert _backlog(jobs, 1, 99) == 3
    assert queue.remove(f"{run}-a2") == 1 and queue.remove(f"{run}-a2") == 0
    assert _backlog(jobs, 1, 99) == 2
    # Gone some other way (RQ's own job.cancel on a plain Queue, a worker killed mid-dequeue):
    # the worker's maintenance finds it.
    Job.fetch(f"{run}-a3", connection=jobs.redis, serializer=queue.serializer).cancel()
    assert queue.reconcile() == 1
    assert _backlog(jobs, 1, 99) == 1
    assert queue.remove(f"{run}-a4") == 1
    assert _backlog(jobs, 1, 99) == 0 and jobs.tenants_waiting(["tiny"]) == {"tiny": 0}


def test_a_cancelled_job_among_others_keeps_the_rest_in_fair_order(redis_server):
    """Cancelling one of a user's jobs lowers the server's count by one; the user's other jobs keep
    their places, and a light server still goes ahead of them."""
    jobs = small_queue(redis_server)
    queue, run = jobs.queue("tiny"), snowflake()[-8:]
    for i in range(4):
        jobs.submit(request(f"{run}-a{i}", guild=1, user=10))
    Cancelling(jobs, lambda job: None).cancel(f"{run}-a1", user_id=10, guild_id=1, is_admin=False)
    assert _backlog(jobs, 1, 10) == 3
    jobs.submit(request(f"{run}-b0", guild=2, user=20))
    order = queue.get_job_ids()
    assert order.index(f"{run}-b0") < order.index(f"{run}-a3")
    assert [j for j in order if "-a" in j] == [f"{run}-a0", f"{run}-a2", f"{run}-a3"]
