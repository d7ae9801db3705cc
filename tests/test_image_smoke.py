"""The worker image's smoke test without Docker (docker/smoke.sh builds and runs the image; this
runs the image's own command the same way, so CI checks it on every run): ``python -m worker.main``
with the tiny model compiled on the CPU (IMAGINE_COMPILE=default: inductor builds C code with
the system compiler, as the image's build-essential allows), compile caches on the "model
volume", Redis with a password; /healthz turns 200 only once compiled and registered; one job
through the queue (docker/smoke_job.py); SIGTERM exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from redis import Redis

from tests.support.stack import ROOT, RedisServer, free_port, wait_for
from tests.test_health import healthz


@pytest.fixture(scope="module")
def password_redis():
    server = RedisServer().start()
    Redis.from_url(server.url).config_set("requirepass", "smoke-password")
    yield server
    server.cleanup()


@pytest.mark.slow  # torch.compile on the CPU
def test_worker_image_command_compiles_answers_health_and_runs_a_job(processes, password_redis, tiny_model_dir,
                                                                     tmp_path):
    started = time.monotonic()
    port = free_port()
    models = tmp_path / "models"  # the model volume: compile caches land here
    tiny = {"tiny": {"source": str(tiny_model_dir), "pipeline": "StableDiffusionPipeline", "native_size": 64,
                     "default_steps": 2, "variant": None, "fast": None}}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HOME": str(tmp_path),
           "TORCHINDUCTOR_CACHE_DIR": str(models / "compile-cache" / "inductor"),
           "TRITON_CACHE_DIR": str(models / "compile-cache" / "triton"),
           "IMAGINE_REDIS_URL": password_redis.url, "IMAGINE_REDIS_PASSWORD": "smoke-password",
           "IMAGINE_MODELS": json.dumps(tiny), "IMAGINE_WORKER_MODELS": '["tiny"]', "IMAGINE_DEFAULT_MODEL": "tiny",
           "IMAGINE_MIN_SIZE": "64", "IMAGINE_DEVICE": "cpu", "IMAGINE_COMPILE": "default",
           "IMAGINE_COMPILE_BATCH_SIZES": "[1]", "IMAGINE_MAX_BATCH_IMAGES": "1", "IMAGINE_MAX_COUNT": "1",
           "IMAGINE_SAFETY_SOURCE": str(tiny_model_dir), "IMAGINE_SAFETY_THRESHOLD": "1.0",
           "IMAGINE_WORKER_METRICS_PORT": str(port), "IMAGINE_QUEUE_PREFIX": "smoke"}
    worker = processes.worker(env, name="image-smoke", ready=False)  # the image's CMD
    worker.wait_ready(lambda: healthz(port)[0] == 200, 600, "/healthz 200 (compiled and registered)")
    healthy = time.monotonic() - started
    job = subprocess.run([sys.executable, str(ROOT / "docker" / "smoke_job.py"), "--timeout", "120"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert job.returncode == 0, job.stdout + job.stderr + worker.log()[-3000:]
    assert any((models / "compile-cache" / "inductor").iterdir())
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.popen.wait(30) == 0, worker.log()[-3000:]
    wait_for(lambda: not worker.alive(), 1)
    print(f"image smoke (no Docker): healthy after {healthy:.0f} s, done in {time.monotonic() - started:.0f} s;"
          f" {job.stdout.strip()}")
