"""A worker runs only the project's own job function, and only jobs of a contract version it
knows: anything else in its queue (anyone who can write to Redis can put it there) is refused
without being imported, or handed back for a newer worker (worker.job_functions)."""

from __future__ import annotations

import time

import pytest
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from core.fair_queue import FairQueue
from core.jobs import JOB_FUNCTION, SCHEMA_VERSION, JobRequest, queue_name
from tests.support.fake_discord import snowflake
from tests.support.stack import ROOT, free_port, wait_for

PREFIX = f"allow{snowflake()[-6:]}"
PROBE = "imagine_probe_module"  # a module that leaves a file behind when imported


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe")
    (folder / f"{PROBE}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(folder / 'imported')!r}).write_text('imported')\n"
        "def run(*args, **kwargs):\n"
        f"    pathlib.Path({str(folder / 'ran')!r}).write_text('ran')\n")
    return folder


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def worker(processes, env, probe_dir):
    # The probe module is importable by the worker, as any installed module would be.
    return processes.worker({**env, "IMAGINE_QUEUE_PREFIX": PREFIX, "IMAGINE_WORKER_METRICS_PORT": str(METRICS_PORT),
                             "PYTHONPATH": f"{ROOT}:{probe_dir}"})


def test_a_serving_worker_is_healthy(worker):
    from tests.test_health import healthz

    wait_for(lambda: healthz(METRICS_PORT)[0] == 200, 30, 0.2, "worker /healthz 200")


def queue(redis: Redis) -> FairQueue:
    return FairQueue(queue_name("tiny", PREFIX), connection=redis, serializer=JSONSerializer)


def request(job_id: str) -> JobRequest:
    return JobRequest(job_id=job_id, model="tiny", prompt="secret prompt words", steps=2, guidance=7.5,
                      seed=1, size=64)


def status(redis: Redis, job_id: str) -> str:
    return Job.fetch(job_id, connection=redis, serializer=JSONSerializer).get_status()


def test_jobs_naming_other_functions_are_refused_never_imported(worker, redis_server, probe_dir, tmp_path):
    redis = Redis.from_url(redis_server.url)
    q = queue(redis)
    touched = tmp_path / "os-system-ran"
    evil = {
        "os.system": [f"touch {touched}"],
        "subprocess.call": [["touch", str(touched)]],
        "builtins.eval": [f"open({str(touched)!r}, 'w')"],
        f"{PROBE}.run": ["x"],
    }
    ids = {name: q.enqueue(name, *args, job_id=f"{PREFIX}-evil{i}",
                           on_failure=None).id for i, (name, args) in enumerate(evil.items())}
    # A legit job with a callback name that is not ours: it runs, the callback is ignored.
    legit = q.enqueue(JOB_FUNCTION, request(f"{PREFIX}-ok").model_dump(mode="json"), job_id=f"{PREFIX}-ok")
    wait_for(lambda: status(redis, legit.id) == "finished", 60, 0.2, "the legit job after the refused ones")

    for name, job_id in ids.items():
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        assert job.get_status() == "failed", name
        assert job_id in q.failed_job_registry.get_job_ids()
        assert "refused" in job.latest_result().exc_string
        assert f"refused job {job_id}" in worker.log() and repr(name) in worker.log()
    assert not touched.exists()
    assert not (probe_dir / "imported").exists() and not (probe_dir / "ran").exists()
    assert str(touched) not in worker.log()  # never the arguments
    assert "secret prompt words" not in worker.log()  # RQ's description line (the prompt) is off
    assert worker.alive()


def test_a_job_from_a_newer_release_goes_back_to_the_queue(worker, redis_server):
    redis = Redis.from_url(redis_server.url)
    q = queue(redis)
    newer = {**request(f"{PREFIX}-new").model_dump(mode="json"), "schema_version": SCHEMA_VERSION + 1,
             "a_field_this_release_lacks": "kept"}
    q.enqueue(JOB_FUNCTION, newer, job_id=f"{PREFIX}-new")
    legit = q.enqueue(JOB_FUNCTION, request(f"{PREFIX}-after").model_dump(mode="json"), job_id=f"{PREFIX}-after")
    wait_for(lambda: status(redis, legit.id) == "finished", 60, 0.2, "the job behind the newer one")
    wait_for(lambda: "contract version" in worker.log(), 10, 0.2, "the hand-back line")
    time.sleep(2 * 2.0 + 0.5)  # the worker meets it again at least once (2 s pause each time)
    job = Job.fetch(f"{PREFIX}-new", connection=redis, serializer=JSONSerializer)
    assert job.get_status() == "queued" and job.id in q.get_job_ids()
    assert job.args[0]["a_field_this_release_lacks"] == "kept"  # untouched, for a newer worker
    assert worker.log().count(f"job {job.id} has contract version") == 1  # logged once
    assert worker.alive()


def test_jobs_without_a_version_are_version_one_and_run():
    from worker.job_functions import schema_of, too_new

    legacy = Job.create(JOB_FUNCTION, args=[{"job_id": "x"}], connection=Redis(), serializer=JSONSerializer)
    assert schema_of(legacy) == 1 and not too_new(legacy)
    current = Job.create(JOB_FUNCTION, args=[request("y").model_dump(mode="json")], connection=Redis(),
                         serializer=JSONSerializer)
    assert schema_of(current) == SCHEMA_VERSION and not too_new(current)


def test_functions_resolve_through_the_mapping_so_a_rename_keeps_queued_jobs(monkeypatch):
    """A job names its function by the path it had when queued: a legacy path in the mapping
    still runs the current function, and no job's path is ever imported."""
    import worker.job_functions as job_functions
    from worker.job_functions import ImagineJob, RefusedJob

    monkeypatch.setitem(job_functions.JOB_FUNCTIONS, "worker.old_tasks.run_imagine", ("worker.tasks", "run_imagine"))
    legacy = ImagineJob.create("worker.old_tasks.run_imagine", args=[{}], connection=Redis(), serializer=JSONSerializer)
    from worker.tasks import run_imagine

    assert legacy.func is run_imagine  # worker.old_tasks does not exist: it was never imported
    foreign = ImagineJob.create("os.system", args=["true"], connection=Redis(), serializer=JSONSerializer,
                                on_failure="os.abort")
    with pytest.raises(RefusedJob):
        foreign.func
    assert foreign.failure_callback is None  # a callback that is not ours is ignored, not imported


@pytest.mark.parametrize("data", [b"\x80\x04pickled(os.system)", b"{}", b"[1, 2, 3]", b"[5, null, [], {}]"])
def test_a_job_whose_data_does_not_deserialize_is_refused_and_the_worker_goes_on(redis_server, data):
    """A pickled job in a JSON worker's queue (or any hash whose data is not RQ's 4-list) used to
    raise out of ``allowed()``: RQ's loop ended the worker, the next one met the same job."""
    from worker.rq_worker import ImagineQueue, ImagineWorker

    redis = Redis.from_url(redis_server.url)
    prefix = f"undeser{snowflake()[-6:]}"
    q = ImagineQueue(queue_name("tiny", prefix), connection=redis, serializer=JSONSerializer)
    bad = q.enqueue(JOB_FUNCTION, {"job_id": "x"}, job_id=f"{prefix}-bad")
    redis.hset(bad.key, "data", data)
    worker = ImagineWorker([q], connection=redis, serializer=JSONSerializer, name=f"{prefix}-w")
    worker.execute_job(Job.fetch(bad.id, connection=redis, serializer=JSONSerializer), q)
    assert bad.id in q.failed_job_registry.get_job_ids()
    assert "refused" in Job.fetch(bad.id, connection=redis, serializer=JSONSerializer).latest_result().exc_string
    assert redis.lrange(q.intermediate_queue_key, 0, -1) == []


@pytest.mark.parametrize("version, expected", [
    (SCHEMA_VERSION + 1, SCHEMA_VERSION + 1), (str(SCHEMA_VERSION + 1), SCHEMA_VERSION + 1),
    (float(SCHEMA_VERSION + 1), SCHEMA_VERSION + 1), (True, 1), (2.5, 1), ("x", 1), (None, 1), (10**30, 10**30)])
def test_a_version_reads_as_the_request_parses_it(version, expected):
    """``"3"`` and ``3.0`` are version 3 to JobRequest (pydantic, lax): a worker must not run them
    as version 1 and drop their new fields. What no parsing reads as a number fails validation."""
    from worker.job_functions import schema_of, too_new

    payload = {**request("v").model_dump(mode="json"), "schema_version": version}
    job = Job.create(JOB_FUNCTION, args=[payload], connection=Redis(), serializer=JSONSerializer)
    assert schema_of(job) == expected and too_new(job) == (expected > SCHEMA_VERSION)
    if expected <= SCHEMA_VERSION and version not in (2.5, "x", None):
        assert JobRequest.model_validate(payload).schema_version == expected
    odd = Job.create(JOB_FUNCTION, kwargs={}, connection=Redis(), serializer=JSONSerializer)
    odd._args = {"schema_version": 9}  # args that are not a list: version 1, never a KeyError
    assert schema_of(odd) == 1


@pytest.mark.parametrize("name", [f"{JOB_FUNCTION} ", f" {JOB_FUNCTION}", JOB_FUNCTION.upper(),
                                  JOB_FUNCTION.replace(".run_imagine", ":run_imagine"),
                                  JOB_FUNCTION.replace("i", "\u0456"), f"{JOB_FUNCTION}\x00", "worker.tasks"])
def test_near_spellings_of_the_job_function_are_not_it(name):
    from worker.job_functions import ImagineJob, allowed

    job = ImagineJob.create(name, args=[{}], connection=Redis(), serializer=JSONSerializer)
    assert not allowed(job)
    with pytest.raises(Exception, match="not one of this worker's"):
        job.func  # noqa: B018 - the property resolves (or refuses) the name
