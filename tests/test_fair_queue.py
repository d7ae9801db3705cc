"""The fair queue (core.fair_queue): one RQ list per model kept in fair order, so RQ's plain
dequeue from the head serves tenants (servers, the web) and users fairly. Real redis-server;
each test below fails on a plain FIFO list."""

from __future__ import annotations

import time

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from core.admission import Requester, admit
from core.expiry import expire_stale_jobs
from core.fair_queue import DRIFT, FairQueue
from core.jobs import Delivery, JobRequest
from core.policy import GuildPolicy
from core.policy_store import PolicyStore, Quota
from core.queue import Cancelling, JobQueue, QueueBusy
from core.validation import ImagineOptions
from settings.config import Settings
from tests.support.fake_discord import snowflake
from tests.test_expiry import queued_ago


def settings_for(redis_server, **extra) -> Settings:
    return Settings(redis_url=redis_server.url, queue_prefix=f"fq{snowflake()[-7:]}", default_model="tiny",
                    min_size=64, models={"tiny": {"source": "-", "pipeline": "StableDiffusionPipeline",
                                                  "native_size": 64, "default_steps": 1}},
                    _env_file=None, **extra)


RUN = {"tag": ""}  # job ids are global in Redis: each test's get its own prefix


@pytest.fixture(autouse=True)
def _unique_ids():
    RUN["tag"] = f"t{snowflake()[-8:]}-"


def jid(name: str) -> str:
    return RUN["tag"] + name


def request(job_id: str, guild: int | None, user: int) -> JobRequest:
    return JobRequest(job_id=jid(job_id), model="tiny", prompt="a lake", steps=2, guidance=7, seed=1, size=64,
                      delivery=Delivery(application_id=1, interaction_id=1, guild_id=guild, user_id=user))


@pytest.fixture
def jobs(redis_server) -> JobQueue:
    return JobQueue(Redis.from_url(redis_server.url), settings_for(redis_server))


def take(jobs: JobQueue, count: int = 1) -> list[str]:
    """What a worker does: RQ's dequeue from the head, then the lease pipeline's bookkeeping."""
    queue, taken = jobs.queue("tiny"), []
    for _ in range(count):
        job, _ = Queue.dequeue_any([queue], None, connection=jobs.redis, serializer=JSONSerializer)
        with jobs.redis.pipeline() as pipe:
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            queue.taken([job.id], pipe)
            pipe.execute()
        taken.append(job.id.removeprefix(RUN["tag"]))
    return taken


def ids(jobs: JobQueue) -> list[str]:
    return [i.removeprefix(RUN["tag"]) for i in jobs.queue("tiny").get_job_ids()]


def test_a_light_tenant_goes_ahead_of_a_flooding_tenants_backlog(jobs):
    for i in range(30):
        jobs.submit(request(f"a{i}", guild=1, user=10))
    take(jobs, 2)  # two busy workers took the head
    position = jobs.submit(request("b0", guild=2, user=20))
    assert position is not None and position <= 2, ids(jobs)[:5]
    assert ids(jobs).index("b0") <= 1
    assert jobs.queue("tiny").count == 29  # nothing lost or duplicated


def test_within_a_server_a_second_user_does_not_wait_for_all_twenty(jobs):
    for i in range(20):
        jobs.submit(request(f"u1-{i}", guild=1, user=10))
    jobs.submit(request("u2-0", guild=1, user=11))
    jobs.submit(request("u2-1", guild=1, user=11))
    order = ids(jobs)
    assert order.index("u2-0") <= 2
    assert order.index("u2-1") <= 5  # then every other job of the server
    assert order.index("u1-19") == len(order) - 1


def test_a_user_who_just_ran_many_jobs_yields_to_one_who_ran_none(jobs):
    for i in range(8):
        jobs.submit(request(f"heavy{i}", guild=1, user=10))
    take(jobs, 8)  # all done: the queue is idle again
    jobs.submit(request("heavy-again", guild=1, user=10))
    jobs.submit(request("fresh", guild=2, user=20))
    assert ids(jobs) == ["fresh", "heavy-again"]


def test_a_flood_of_new_tenants_cannot_postpone_an_old_job_forever(jobs):
    """Every dequeue moves virtual time on, so newcomers (each at the current virtual time) can
    overtake a waiting job only a bounded number of times."""
    for i in range(3):
        jobs.submit(request(f"old{i}", guild=1, user=10))
    taken, guild = [], 100
    while "old2" not in taken:  # a new server arrives for every job a worker takes
        guild += 1
        jobs.submit(request(f"new{guild}", guild=guild, user=guild))
        taken += take(jobs)
        assert len(taken) < 1000, "old2 starved"
    assert len(taken) <= 2 / DRIFT + 3  # its tag was V + 2: V passes it after 2 / DRIFT takes


def test_a_retry_goes_to_the_front(jobs):
    for i in range(5):
        jobs.submit(request(f"a{i}", guild=1, user=10))
    jobs.submit(request("b0", guild=2, user=20))
    queue = jobs.queue("tiny")
    queue.push_job_id(jid("a-retry"), at_front=True)  # what RQ does for a job whose worker died
    assert ids(jobs)[0] == "a-retry"
    jobs.submit(request("c0", guild=3, user=30))
    assert ids(jobs)[0] == "a-retry"


def test_cancel_and_expiry_keep_the_fair_order_consistent(jobs, redis_server):
    for i in range(4):
        jobs.submit(request(f"a{i}", guild=1, user=10))
    queue = jobs.queue("tiny")
    canceller = Cancelling(jobs, lambda job: None)
    canceller.cancel(jid("a1"), user_id=10, guild_id=1, is_admin=False)
    assert Job.fetch(jid("a1"), connection=jobs.redis, serializer=JSONSerializer).get_status() == JobStatus.CANCELED
    assert jobs.redis.zscore(queue.fair_key, jid("a1")) is None
    queued_ago(jobs.redis, jid("a2"), 10_000)
    policies = PolicyStore(jobs.redis, jobs.settings.queue_prefix)
    assert [r.job_id for r in expire_stale_jobs(jobs, policies, ["tiny"], 600)] == [jid("a2")]
    assert jobs.redis.zscore(queue.fair_key, jid("a2")) is None
    assert ids(jobs) == ["a0", "a3"]
    jobs.submit(request("b0", guild=2, user=20))  # pivots that left are skipped
    assert ids(jobs).index("b0") == 1
    # A tag left behind (a worker died between dequeue and lease) is dropped by maintenance.
    jobs.redis.lrem(queue.key, 1, jid("a3"))
    assert queue.reconcile() == 1
    assert set(m.decode() for m in jobs.redis.zrange(queue.fair_key, 0, -1)) == set(map(jid, ids(jobs)))


def test_batching_companions_stay_at_the_head(jobs):
    """Compatible jobs of different servers interleave at the head, where batching claims them."""
    for i in range(3):
        jobs.submit(request(f"a{i}", guild=1, user=10))
        jobs.submit(request(f"b{i}", guild=2, user=20))
    from worker.batching import claim_companions  # noqa: PLC0415 (worker code; torch-free here)
    lead = take(jobs)[0]
    claimed = claim_companions(jobs.queue("tiny"), request(lead, 1, 10), max_images=4)
    assert [job.id for job in claimed] == [jid("b0"), jid("a1"), jid("b1")]


def test_the_outlook_follows_the_fair_order_not_the_list_length(jobs):
    for i in range(25):
        jobs.submit(request(f"a{i}", guild=1, user=10))
    assert jobs.outlook_if_enqueued(request("b0", guild=2, user=20)).position == 2
    assert jobs.outlook_if_enqueued(request("a-more", guild=1, user=10)).position == 26


def test_back_pressure_refuses_at_once_with_the_wait(redis_server):
    settings = settings_for(redis_server, queue_ttl_s=600)
    jobs = JobQueue(Redis.from_url(redis_server.url), settings)
    for _ in range(5):
        jobs.stats.record("tiny", 60_000)  # one minute per job
    jobs.workers_for = lambda model: 1  # one live worker
    for i in range(12):
        jobs.submit(request(f"a{i}", guild=1, user=10))
    with pytest.raises(QueueBusy, match=r"busy.*about 12 min"):
        jobs.admission_outlook(request("a-more", guild=1, user=10))
    assert jobs.admission_outlook(request("b0", guild=2, user=20)).position == 2  # fair: not refused


def test_back_pressure_caps_the_depth_and_a_tenants_share(redis_server):
    settings = settings_for(redis_server, queue_max_depth=20, tenant_max_share=0.25)
    jobs = JobQueue(Redis.from_url(redis_server.url), settings)
    for i in range(5):
        jobs.submit(request(f"a{i}", guild=1, user=10))
    with pytest.raises(QueueBusy, match="this server already has about 5 images"):
        jobs.admission_outlook(request("a5", guild=1, user=11))
    for guild in range(2, 17):
        jobs.submit(request(f"g{guild}", guild=guild, user=guild))
    with pytest.raises(QueueBusy, match="20 images are waiting"):
        jobs.admission_outlook(request("late", guild=99, user=99))


def test_a_busy_refusal_takes_no_slot(redis_server):
    settings = settings_for(redis_server, queue_max_depth=1)
    redis = Redis.from_url(redis_server.url)
    jobs, policies = JobQueue(redis, settings), PolicyStore(redis, settings.queue_prefix)
    jobs.submit(request("first", guild=3, user=30))
    requester = Requester(user_id=10, guild_id=1, channel_id=None)
    with pytest.raises(QueueBusy):
        admit(ImagineOptions(prompt="a lake"), requester, job_id=jid("second"), settings=settings,
              catalog=settings.catalog(), policies=policies, jobs=jobs)
    assert policies.active_jobs(1, 10) == []  # nothing taken, not even the rate


def test_default_per_user_limits_are_on_and_servers_can_change_them():
    settings = Settings(_env_file=None)
    assert settings.default_max_active_jobs >= 1 and settings.default_rate_count >= 1
    default = Quota.for_user(GuildPolicy(), 1, 2, settings.default_max_active_jobs,
                             settings.default_rate_count, settings.default_rate_window_s)
    assert (default.max_active, default.rate_count) == (settings.default_max_active_jobs,
                                                        settings.default_rate_count)
    loose = Quota.for_user(GuildPolicy(max_active_jobs=50, rate_count=100, rate_window_s=30), 1, 2,
                           settings.default_max_active_jobs, settings.default_rate_count)
    assert (loose.max_active, loose.rate_count, loose.rate_window_s) == (50, 100, 30)
    requester = Requester(user_id=2, guild_id=1, channel_id=None)
    assert requester.quotas_under(GuildPolicy(), settings)[0].max_active == settings.default_max_active_jobs


def test_web_clients_are_users_of_one_web_tenant():
    from web.policy import client_digest, web_requester  # noqa: PLC0415
    settings = Settings(_env_file=None)
    assert web_requester(settings, "1.2.3.4").owner() == ("web", client_digest("1.2.3.4"))
    assert Requester(user_id=7, guild_id=None, channel_id=None).owner() == ("dm", "7")


def test_queue_lists_jobs_in_start_order_and_models_counts_tenants(jobs):
    for i in range(6):
        jobs.submit(request(f"a{i}", guild=1, user=10))
    jobs.submit(request("b0", guild=2, user=20))
    jobs.submit(request("b1", guild=2, user=20))
    assert jobs.tenants_waiting(["tiny"]) == {"tiny": 2}
    assert jobs.depths(["tiny"]) == {"tiny": 8}
    from bot.commands.models import model_line  # noqa: PLC0415
    line = model_line(jobs.settings.catalog()["tiny"], True, 8, None, 2)
    assert "8 waiting from 2 servers" in line
    for i in (5, 0, 3):
        jobs.save_record(request(f"a{i}", 1, 10), {})
    jobs.save_record(request("b1", 2, 10), {})  # the same user in another server
    listed = jobs.user_jobs(10)
    assert [j.request.job_id for j in listed] == [jid("a0"), jid("b1"), jid("a3"), jid("a5")]  # fair order
    assert [j.outlook.position for j in listed] == [1, 4, 6, 8]
    from bot.commands.queue import job_line  # noqa: PLC0415
    assert "#4 in queue" in job_line(listed[1])


def test_a_fair_queue_is_an_rq_queue_for_every_worker(jobs):
    assert isinstance(jobs.queue("tiny"), FairQueue)
    from worker.rq_worker import ImagineQueue  # noqa: PLC0415
    assert issubclass(ImagineQueue, FairQueue)
    jobs.submit(request("j1", guild=1, user=10))
    assert Job.fetch(jid("j1"), connection=jobs.redis, serializer=JSONSerializer).meta["fair"] == ["1", "10"]
    assert time.time() > 0
