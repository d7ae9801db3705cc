"""A real Redis Sentinel failover under the bot's admission path.

A primary and a replica (both AOF, ``appendfsync everysec``) and one sentinel (quorum 1) run on
loopback ports. The bot's own steps for a command — claim, admit (policy, back-pressure,
quotas), enqueue with ``redis_min_replicas_ack=1`` — run in a loop through the sentinel-mode
client while the primary is SIGKILLed. Every command ends one of two ways: accepted ("Queued")
or a RedisError (the bot's "queue unavailable"); after the switch, every accepted job must be on
the new primary, still queued, and commands must be accepted again.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from core.admission import Requester, admit, enqueue_admitted
from core.policy_store import PolicyStore
from core.queue import JobQueue
from core.redis_connection import connect_front, connect_worker
from core.validation import ImagineOptions
from settings.config import Settings
from tests.support.stack import free_port, wait_for

pytestmark = pytest.mark.e2e
MASTER = "imagine"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class Node:
    def __init__(self, args: list[str], port: int, work: Path):
        self.port, self.args = port, args
        self.log = work / f"{port}.log"
        self.client = Redis(port=port, socket_timeout=1)
        self.start()

    def start(self, *extra: str) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([REDIS_SERVER, *self.args, *extra], stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def sentinel_set():
    work = Path(tempfile.mkdtemp(prefix="imagine-failover-"))
    nodes: list[Node] = []
    try:
        primary_port, replica_port, sentinel_port = free_port(), free_port(), free_port()

        def server(port: int, *extra: str) -> Node:
            (work / str(port)).mkdir()
            node = Node(["--port", str(port), "--bind", "127.0.0.1", "--dir", str(work / str(port)), "--save", "",
                         "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
                         *extra], port, work)
            nodes.append(node)
            return node

        primary = server(primary_port)
        replica = server(replica_port, "--replicaof", "127.0.0.1", str(primary_port))
        # The sentinel learns of replicas from the primary's INFO (every 10 s once it runs):
        # start it once the replica is attached, so its first look finds it.
        wait_for(lambda: _up(replica), 20, what="replica attached")
        conf = work / "sentinel.conf"
        conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {work}\n"
                        f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 1\n"
                        f"sentinel down-after-milliseconds {MASTER} 1000\n"
                        f"sentinel failover-timeout {MASTER} 5000\n"
                        f"sentinel parallel-syncs {MASTER} 1\n")
        sentinel = Node([str(conf), "--sentinel"], sentinel_port, work)
        nodes.append(sentinel)
        wait_for(lambda: _up(replica) and _known_replicas(sentinel) == 1, 20, what="replica seen by the sentinel")
        yield primary, replica, sentinel
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(work, ignore_errors=True)


def _up(node: Node) -> bool:
    try:
        return node.client.info("replication").get("master_link_status") == "up"
    except RedisError:
        return False


def _known_replicas(sentinel: Node) -> int:
    try:
        return len([r for r in sentinel.client.sentinel_slaves(MASTER) if not r.get("is_sdown")])
    except RedisError:
        return 0


@pytest.mark.parametrize("kind", ["sigkill", "sentinel-failover"])
def test_a_failover_loses_no_accepted_job(sentinel_set, kind):
    """``sigkill``: the primary's host crashes; ``sentinel-failover``: a planned switch
    (SENTINEL FAILOVER), the old primary turned into the new one's replica by the sentinel."""
    primary, replica, sentinel = sentinel_set
    settings = Settings(_env_file=None, redis_url="redis:///0", redis_sentinels=[f"127.0.0.1:{sentinel.port}"],
                        redis_sentinel_master=MASTER, redis_min_replicas_ack=1, redis_replica_ack_timeout_ms=300,
                        redis_timeout_s=0.5, queue_max_depth=100_000, tenant_max_share=1.0,
                        models={"tiny": {"source": "x", "pipeline": "StableDiffusionPipeline", "native_size": 64}},
                        default_model="tiny", min_size=64)
    jobs = JobQueue(connect_front(settings), settings)
    policies = PolicyStore(jobs.redis, settings.queue_prefix, jobs.job_lifetime_s())
    catalog = settings.catalog()
    accepted: list[str] = []
    told = 0
    killed_at = switched_at = None
    deadline = time.monotonic() + 45  # generous: a busy CI host resyncs slower

    def one_command(n: int) -> None:
        nonlocal told
        job_id = f"fo-{n}"
        try:
            if not jobs.claim(job_id):
                return
            admitted = admit(ImagineOptions(f"a lighthouse #{n}", size=64), Requester(user_id=n, guild_id=7,
                                                                                        channel_id=8),
                             job_id=job_id, settings=settings, catalog=catalog, policies=policies, jobs=jobs)
            enqueue_admitted(admitted, jobs, policies)
        except RedisError:
            told += 1  # the bot: "⏳ The image queue is unavailable right now."
            return
        accepted.append(job_id)

    n = 0
    after_switch = 0
    recovered_at = None
    # A planned switch ends 1 s after the sentinel names the new primary: its old primary
    # becomes a replica (so WAIT 1 can be met again) only at the sentinel's next 10 s look.
    planned_done = lambda: kind != "sigkill" and switched_at is not None and time.monotonic() - switched_at > 1
    while time.monotonic() < deadline and after_switch < 10 and not planned_done():
        n += 1
        one_command(n)
        if killed_at is None and len(accepted) >= 30:
            if kind == "sigkill":
                primary.process.send_signal(signal.SIGKILL)  # a crashed host: no goodbye
                primary.process.wait()
            else:
                sentinel.client.execute_command("SENTINEL", "FAILOVER", MASTER)
            killed_at, before_kill = time.monotonic(), len(accepted)
        elif killed_at is not None and switched_at is None:
            address = sentinel.client.sentinel_get_master_addr_by_name(MASTER)
            if address and int(address[1]) == replica.port:
                switched_at = time.monotonic()
                at_switch = len(accepted)
                # The crashed host comes back (compose restarts it) as the new primary's replica,
                # and WAIT 1 can be met again. (Started as a primary, the sentinel would turn it
                # into a replica itself, within its 10 s INFO period: slower, same outcome.)
                if kind == "sigkill":
                    primary.start("--replicaof", "127.0.0.1", str(replica.port))
        elif switched_at is not None:
            after_switch = len(accepted) - at_switch
            if after_switch == 1:
                recovered_at = time.monotonic()
        time.sleep(0.01)
    assert killed_at is not None and switched_at is not None, "no failover happened"
    if kind == "sigkill":
        assert after_switch >= 10, "commands were not accepted again after the failover"
    # The sentinel's primary now: the promoted replica, or — on a loaded host, where the new
    # primary can miss down-after-milliseconds too — the restarted old one, after a second switch.
    # Either way every accepted job must be there.
    def settled_primary():
        port = int(sentinel.client.sentinel_get_master_addr_by_name(MASTER)[1])
        node = replica if port == replica.port else primary
        try:
            return node.client if node.client.info("replication")["role"] == "master" else None
        except RedisError:
            return None

    new_primary = wait_for(settled_primary, 20, what="the sentinel's primary answering as master")
    queued = {job_id.decode() for job_id in new_primary.lrange(jobs.queue("tiny").key, 0, -1)}
    lost = [job_id for job_id in accepted
            if job_id not in queued or not Job.exists(job_id, connection=new_primary)]
    print(f"\n{kind} failover (WAIT 1): {len(accepted)} accepted "
          f"({before_kill} before the switch began), {told} told unavailable, {len(lost)} lost; "
          f"switch took {switched_at - killed_at:.1f} s"
          + (f", accepting again {recovered_at - switched_at:.1f} s later" if kind == "sigkill" else ""))
    if kind == "sigkill":
        assert told > 0  # the switch was seen: commands during it were told, not left hanging
    assert lost == []
    job = Job.fetch(accepted[-1], connection=new_primary, serializer=JSONSerializer)
    assert job.get_status() == "queued"
    # A worker's client (same factory) reaches the new primary, and so does RQ's scheduler, which
    # rebuilds its connection from the client's pool arguments (the sentinel-managed kind).
    worker_client = connect_worker(settings)
    assert worker_client.info("replication")["role"] == "master"
    scheduler = RQScheduler([jobs.queue("tiny").name], connection=worker_client)
    assert scheduler.connection.info("replication")["role"] == "master"
