"""Backup and restore of Redis as docs/operations.md gives them (scripts/redis_backup.sh): a
snapshot of a running, password-protected server with a queued job, restored into the data
directory of a fresh server that runs with AOF on (as compose runs it); every key comes back
with the same content, and a worker of the new server runs the queued job."""

from __future__ import annotations

import os
import shutil
import subprocess

from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from core.jobs import JobRequest, queue_name
from core.queue import JobQueue
from settings.config import Settings
from tests.support.stack import ROOT, RedisServer, free_port, wait_for

SCRIPT = str(ROOT / "scripts" / "redis_backup.sh")
PASSWORD = "backup-test-password"


def test_backup_then_restore_into_a_fresh_server_keeps_the_queue(processes, env, tmp_path):
    source = RedisServer(appendonly=True).start()
    target = None
    try:
        Redis.from_url(source.url).config_set("requirepass", PASSWORD)
        redis = Redis.from_url(source.url, password=PASSWORD)
        prefix = "backup"
        jobs = JobQueue(redis, Settings(_env_file=None, redis_url=source.url, queue_prefix=prefix))
        jobs.submit(JobRequest(job_id="backup-job", model="tiny", prompt="a restored cat", steps=2,
                               guidance=7.5, seed=5, size=64))
        redis.set(f"{prefix}:user:42", '{"model": "tiny"}')
        before = contents(redis)

        backup = tmp_path / "imagine.rdb"
        run_env = {**os.environ, "REDISCLI_AUTH": PASSWORD}
        done = subprocess.run([SCRIPT, "backup", source.url, str(backup)], env=run_env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and backup.stat().st_size > 0, done.stderr
        data = tmp_path / "restored"
        done = subprocess.run([SCRIPT, "restore", str(backup), str(data)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"restore: {len(before)} keys" in done.stdout
        assert (data / "appendonlydir").is_dir()

        # A fresh server on the restored directory, AOF on: it loads the AOF written by the restore.
        target = subprocess.Popen([shutil.which("redis-server"), "--port", str(port := free_port()), "--bind",
                                   "127.0.0.1", "--dir", str(data), "--appendonly", "yes", "--save", ""],
                                  stdout=subprocess.DEVNULL)
        restored = Redis(port=port)
        wait_for(lambda: _pings(restored), 10, what="restored redis-server")
        assert contents(restored) == before
        assert restored.lrange(f"rq:queue:{queue_name('tiny', prefix)}", 0, -1) == [b"backup-job"]

        # A worker of the restored server runs the queued job.
        url = f"redis://127.0.0.1:{port}/0"
        worker = processes.worker({**env, "IMAGINE_REDIS_URL": url, "IMAGINE_QUEUE_PREFIX": prefix}, "--burst",
                                  name="restored-worker", ready=False)
        assert worker.popen.wait(120) == 0, worker.log()[-3000:]
        assert Job.fetch("backup-job", connection=restored, serializer=JSONSerializer).get_status() == "finished"
    finally:
        source.cleanup()
        if target is not None:
            target.terminate()
            target.wait(10)


def test_restore_refuses_a_data_directory_in_use(tmp_path):
    (tmp_path / "backup.rdb").write_bytes(b"REDIS0011")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dump.rdb").write_bytes(b"old")
    done = subprocess.run([SCRIPT, "restore", str(tmp_path / "backup.rdb"), str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "not empty" in done.stderr
    assert (tmp_path / "data" / "dump.rdb").read_bytes() == b"old"


def contents(client: Redis) -> dict:
    """Every key's type and value (the encoding, and so DUMP's bytes, may differ after a reload)."""
    read = {b"string": client.get, b"hash": client.hgetall, b"set": client.smembers,
            b"list": lambda key: client.lrange(key, 0, -1),
            b"zset": lambda key: client.zrange(key, 0, -1, withscores=True)}
    found = {}
    for key in client.keys("*"):
        kind = client.type(key)
        found[key] = (kind, read[kind](key) if kind in read else client.dump(key))
    return found


def _pings(client: Redis) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False
